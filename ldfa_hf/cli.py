"""``ldfa-hf``: the demo and the benchmarks, one command each."""

from __future__ import annotations

import argparse
import importlib
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ldfa-hf", description="Low-Dimensional Feedback Alignment for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="ViT on digits, backprop vs LDFA r=10 (a minute on a laptop CPU)", add_help=False)
    bench = sub.add_parser("bench", help="run an experiment from benchmarks/ (e.g. speed, teacher_student)", add_help=False)
    bench.add_argument("name")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from benchmarks import demo

        demo.main(rest)
        return
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError:
        sys.exit(f"ldfa-hf bench: no experiment named {args.name!r} (see the benchmarks/ folder)")
    module.main(rest)


if __name__ == "__main__":
    main()
