"""``ldfa-hf``: the demo and the benchmarks, one command each."""

from __future__ import annotations

import argparse
import importlib
import sys

# experiment name -> what it measures ; each is benchmarks/<name>.py and takes --tiny
EXPERIMENTS = {
    "teacher_student": "a: the smallest rank that matches backprop, task dimensionality d in {2, 4, 8, 16}",
    "mnist": "b, c: accuracy vs rank on MNIST (--model mlp | cnn | vit | convnext) against bp, fa, dfa",
    "shakespeare_lm": "d: character-level Llama on Shakespeare, validation loss vs rank",
    "minilm_genres": "e: MiniLM fine-tuning (full and LoRA) on Shakespeare genres",
    "speed": "f: step time and memory vs backprop (--sweep: widths x ranks, pretraining and LoRA)",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ldfa-hf", description="Low-Dimensional Feedback Alignment for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="ViT on digits, backprop vs LDFA r=10 (about 3 minutes on 2 CPU cores)", add_help=False)
    bench = sub.add_parser("bench", help="run an experiment: " + ", ".join(EXPERIMENTS), add_help=False)
    bench.add_argument("name", nargs="?")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from benchmarks import demo

        demo.main(rest)
        return
    if args.name not in EXPERIMENTS:
        listing = "\n".join(f"  {name:<16} {what}" for name, what in EXPERIMENTS.items())
        sys.exit(("" if args.name is None else f"ldfa-hf bench: no experiment named {args.name!r}\n")
                 + f"usage: ldfa-hf bench NAME [--tiny] [options]\n{listing}")
    importlib.import_module(f"benchmarks.{args.name}").main(rest)


if __name__ == "__main__":
    main()
