"""``ldfa-hf``: the demo (part of the library) and the benchmarks (from a source checkout)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# experiment name -> what it measures; each is benchmarks/<name>.py in a checkout and takes --tiny.
# The letters are the sections of benchmarks/results/RESULTS.md the experiment fills.
EXPERIMENTS = {
    "teacher_student": "a: the smallest rank that matches backprop, task dimensionality d in {2, 4, 8, 16}",
    "mnist": "b, c: accuracy vs rank on MNIST (--model mlp | cnn | vit | convnext) against bp, fa, dfa",
    "shakespeare_lm": "d: character-level Llama on Shakespeare, validation loss vs rank",
    "minilm_genres": "e: MiniLM fine-tuning (full and LoRA; --task genres | pydoc), calibrated variants",
    "minilm_subspace": "e: how much input gradient a fixed rank-r feedback keeps on unseen batches",
    "convnext_transfer": "ConvNeXt pretrained on digits 0-4, fine-tuned on 5-9: bp, svd, calibrated, fixed",
    "speed": "f: step time, share of the floor's saving and memory vs backprop (--sweep, --compile, --gpu-suite)",
    "llm_sft": "g: SmolLM2-135M LoRA fine-tuning, plain LoRA vs LDFA in lockstep (--task arith | sort | pydoc)",
    "sft_trainer": "h: step time and held-out loss through TRL's SFTTrainer, plain LoRA vs for_finetuning()",
    "llm_gradients": "g: SmolLM2-135M LoRA, per block cosine of LDFA's adapter gradients with backprop's",
}


def _benchmarks():
    """The checkout's ``benchmarks`` package (not installed with the library): the current folder's,
    or that of the checkout an editable install points at."""
    try:
        return importlib.import_module("benchmarks")
    except ImportError:
        pass
    package_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), package_checkout):
        if os.path.isfile(os.path.join(root, "benchmarks", "harness.py")):
            sys.path.insert(0, root)
            return importlib.import_module("benchmarks")
    sys.exit("ldfa-hf bench runs the experiments of a source checkout of ldfa_hf: run it from the "
             "repository root (or `python -m benchmarks.NAME` there); they are not part of the installed package")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ldfa-hf", description="Low-Dimensional Feedback Alignment for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a wide MLP on digits, backprop vs LDFA r=10 side by side (about 2 minutes on 2 CPU "
                   "cores)", add_help=False)
    bench = sub.add_parser("bench", help="run an experiment: " + ", ".join(EXPERIMENTS), add_help=False)
    bench.add_argument("name", nargs="?")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo

        demo.main(rest)
        return
    if args.name in (None, "-h", "--help") or args.name not in EXPERIMENTS:
        listing = "\n".join(f"  {name:<18} {what}" for name, what in EXPERIMENTS.items())
        text = ("usage: ldfa-hf bench NAME [--tiny] [options]   (ldfa-hf bench NAME --help for its options)\n"
                f"experiments (a:, b: ... name the sections of benchmarks/results/RESULTS.md they fill):\n{listing}")
        if args.name in ("-h", "--help") or (args.name is None and {"-h", "--help"} & set(rest)):
            print(text)
            return
        sys.exit(("" if args.name is None else f"ldfa-hf bench: no experiment named {args.name!r}\n") + text)
    _benchmarks()
    program = sys.argv[0]
    sys.argv[0] = f"ldfa-hf bench {args.name}"  # argparse names the program from it in usage lines
    try:
        importlib.import_module(f"benchmarks.{args.name}").main(rest)
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    main()
