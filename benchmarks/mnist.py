"""MNIST test accuracy vs feedback rank, against bp, fa and dfa.

    python -m benchmarks.mnist --model mlp        # MLP 784-256-256-10, full 50k training split
    python -m benchmarks.mnist --model cnn        # 3 conv blocks with BatchNorm
    python -m benchmarks.mnist --model vit        # ViT (ViTConfig): patch 7, 2 layers, hidden 64
    python -m benchmarks.mnist --model convnext   # ConvNeXt (ConvNextConfig): bp, LDFA r=10, fixed, fa, dfa
    python -m benchmarks.mnist --model cnn --tiny # seconds

Headline cells (bp, fa, dfa, svd and fixed at r = 10 classes) run ``--seeds`` seeds, the rest
of the rank sweep ``--sweep-seeds``. Cells already in the CSV are skipped, so an interrupted
run continues where it stopped. Results: benchmarks/results/mnist_<model>.csv and .png.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from .data import load_mnist
from .harness import ResultTable, out_path, method_cells, plot_rank_sweep, summary_table, train_classifier

RANKS = (1, 2, 5, 10, 20, 64)
CLASSES = 10
FIELDS = ["model", "method", "rank", "seed", "epochs", "train_examples", "test_accuracy", "seconds"]
# per model: training examples (a prefix of the 50k split) and epochs, sized for 2 CPU cores
SIZES = {"mlp": (50_000, 3), "cnn": (20_000, 3), "vit": (20_000, 3), "convnext": (20_000, 3)}
TITLES = {"mlp": "MLP", "cnn": "CNN with BatchNorm", "vit": "ViT", "convnext": "ConvNeXt"}


def build(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if model == "cnn":
        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                             nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))
    if model == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(
            image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if model == "convnext":
        from transformers import ConvNextConfig, ConvNextForImageClassification

        return ConvNextForImageClassification(ConvNextConfig(
            num_channels=1, patch_size=4, image_size=28, hidden_sizes=[32, 64], depths=[2, 2], num_stages=2,
            num_labels=10))
    raise ValueError(f"unknown model {model!r}: one of {sorted(SIZES)}")


def model_cells(model: str, ranks) -> list[tuple[str, int, bool]]:
    """The harness's (method, rank, headline) cells; ConvNeXt (experiment c) runs the headline ones only."""
    return [c for c in method_cells(ranks, CLASSES) if model != "convnext" or c[2]]


def cells(model: str, ranks, seeds: int, sweep_seeds: int) -> list[dict]:
    """Every (method, rank, seed) to run."""
    out = []
    for method, rank, headline in model_cells(model, ranks):
        out += [{"method": method, "rank": rank, "seed": s} for s in range(seeds if headline else sweep_seeds)]
    return sorted(out, key=lambda c: c["seed"])  # a whole first seed before any repeat


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=sorted(SIZES))
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the headline cells")
    parser.add_argument("--sweep-seeds", type=int, default=1, help="seeds for the rest of the rank sweep")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/mnist_<model>.csv)")
    parser.add_argument("--refit-every", type=int, default=None, help="LDFAConfig.refit_every (svd: ALS refits)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    examples, epochs = SIZES[args.model]
    examples, epochs = args.train_examples or examples, args.epochs or epochs
    test_limit = None
    if args.tiny:
        args.ranks, args.seeds, args.sweep_seeds, epochs, examples, test_limit = [2, 10], 1, 1, 1, 256, 256
    out = out_path(args.out, f"mnist_{args.model}.csv", args.tiny)
    table = ResultTable(out, FIELDS, key=["model", "method", "rank", "seed", "epochs", "train_examples"])
    mnist = load_mnist()  # to tensors once: indexing a formatted Dataset per cell is slow
    train = (mnist["train"]["pixel_values"][:examples], mnist["train"]["labels"][:examples])
    test = (mnist["test"]["pixel_values"][:test_limit], mnist["test"]["labels"][:test_limit])
    common = {"model": args.model, "epochs": epochs, "train_examples": examples}

    def run(cell: dict) -> dict:
        torch.manual_seed(cell["seed"])
        result = train_classifier(build(args.model), train, test, cell["method"], cell["rank"], cell["seed"], epochs,
                                  **({"refit_every": args.refit_every} if args.refit_every else {}))
        return {"test_accuracy": f"{result['accuracy']:.4f}"}

    todo = [dict(common, **c) for c in cells(args.model, args.ranks, args.seeds, args.sweep_seeds)]
    table.run(todo, run, desc=f"mnist {args.model}")
    rows = table.select(**common)
    print(summary_table(rows, model_cells(args.model, args.ranks)))
    plot_rank_sweep(rows, out[:-4] + ".png", f"MNIST, {TITLES[args.model]}: test accuracy vs feedback rank",
                    headline_rank=CLASSES)
    return rows


if __name__ == "__main__":
    main()
