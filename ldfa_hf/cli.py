"""``ldfa-hf``: the demo (part of the library) and the benchmarks (from a source checkout)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# experiment name -> what it measures; each is benchmarks/<name>.py in a checkout and takes --tiny
EXPERIMENTS = {
    "teacher_student": "a: the smallest rank that matches backprop, task dimensionality d in {2, 4, 8, 16}",
    "mnist": "b, c: accuracy vs rank on MNIST (--model mlp | cnn | vit | convnext) against bp, fa, dfa",
    "shakespeare_lm": "d: character-level Llama on Shakespeare, validation loss vs rank",
    "minilm_genres": "e: MiniLM fine-tuning (full and LoRA; --task genres | pydoc), calibrated variants",
    "minilm_subspace": "e: how much input gradient a fixed rank-r feedback keeps on unseen batches",
    "convnext_transfer": "ConvNeXt pretrained on digits 0-4, fine-tuned on 5-9: bp, svd, calibrated, fixed",
    "speed": "f: step time, share of the floor's saving and memory vs backprop (--sweep, --compile, --gpu-suite)",
}


def _benchmarks():
    """The checkout's ``benchmarks`` package (not installed with the library)."""
    try:
        return importlib.import_module("benchmarks")
    except ImportError:
        pass
    if os.path.isfile(os.path.join(os.getcwd(), "benchmarks", "harness.py")):
        sys.path.insert(0, os.getcwd())
        return importlib.import_module("benchmarks")
    sys.exit("ldfa-hf bench runs the experiments of a source checkout of ldfa_hf: run it from the "
             "repository root (or `python -m benchmarks.NAME` there); they are not part of the installed package")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ldfa-hf", description="Low-Dimensional Feedback Alignment for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="ViT on digits, backprop vs LDFA r=10 (about 3 minutes on 2 CPU cores)", add_help=False)
    bench = sub.add_parser("bench", help="run an experiment: " + ", ".join(EXPERIMENTS), add_help=False)
    bench.add_argument("name", nargs="?")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo

        demo.main(rest)
        return
    if args.name not in EXPERIMENTS:
        listing = "\n".join(f"  {name:<18} {what}" for name, what in EXPERIMENTS.items())
        sys.exit(("" if args.name is None else f"ldfa-hf bench: no experiment named {args.name!r}\n")
                 + f"usage: ldfa-hf bench NAME [--tiny] [options]\n{listing}")
    _benchmarks()
    importlib.import_module(f"benchmarks.{args.name}").main(rest)


if __name__ == "__main__":
    main()
