"""MNIST test accuracy vs feedback rank, against bp, fa and dfa (issue #4, experiment b).

    python -m benchmarks.mnist --model mlp                  # ranks 1 2 5 10 20 64, 3 seeds
    python -m benchmarks.mnist --model mlp --tiny           # seconds

Cells already in the CSV are skipped, so an interrupted run continues where it stopped.
Results: benchmarks/results/mnist_<model>.csv and .png.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
from torch import nn

import ldfa_hf

from .data import load_mnist

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RANKS = (1, 2, 5, 10, 20, 64)
FIELDS = ["model", "method", "rank", "seed", "epochs", "test_accuracy", "seconds"]


def build(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if model == "cnn":
        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    raise ValueError(f"unknown model {model!r}: mlp or cnn")


def cells(ranks) -> list[tuple[str, int]]:
    """(method, rank): the LDFA rules over the rank sweep, the ablation at r = 10, references."""
    out = [("bp", 0), ("fa", 0), ("dfa", 0)]
    out += [("svd", r) for r in ranks]
    out += [(rule, 10) for rule in ("local", "oja", "fixed") if 10 in ranks]
    return out


def run_cell(model_name, method, rank, seed, epochs, data, batch_size=128, lr=1e-3, limit=None) -> float:
    torch.manual_seed(seed)
    model = build(model_name)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    steps_per_epoch = len(y_train) // batch_size
    config = ldfa_hf.LDFAConfig(rule=method, rank=max(rank, 1), seed=seed, refresh_every=max(1, steps_per_epoch // 2))
    plugin = ldfa_hf.wrap(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            plugin.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x_test[i:i + 1000]).argmax(-1) == y_test[i:i + 1000]).sum())
                      for i in range(0, len(y_test), 1000))
    return correct / len(y_test)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(method, rank=None):
        vals = [float(r["test_accuracy"]) for r in rows if r["method"] == method and (rank is None or int(r["rank"]) == rank)]
        return statistics.mean(vals) if vals else None

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ranks = sorted({int(r["rank"]) for r in rows if r["method"] == "svd"})
    ax.plot(ranks, [100 * mean("svd", k) for k in ranks], "o-", label="LDFA (svd)")
    for method, style in (("fixed", "x"), ("local", "s"), ("oja", "^")):
        if mean(method) is not None:
            ax.plot([10], [100 * mean(method)], style, label=f"{method} r=10")
    for method, color in (("bp", "k"), ("fa", "tab:red"), ("dfa", "tab:purple")):
        if mean(method) is not None:
            ax.axhline(100 * mean(method), color=color, ls="--", lw=1, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("feedback rank r")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MNIST {rows[0]['model'].upper()}: accuracy vs feedback rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/mnist_<model>.csv)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    limit = None
    if args.tiny:
        args.ranks, args.seeds, args.epochs, limit = [2, 10], 1, 1, 512
    out = args.out or os.path.join(RESULTS, f"mnist_{args.model}.csv")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    done = []
    if os.path.exists(out):
        with open(out, newline="") as fh:
            done = list(csv.DictReader(fh))
    have = {(r["method"], int(r["rank"]), int(r["seed"]), int(r["epochs"])) for r in done}
    todo = [(m, r, s) for s in range(args.seeds) for m, r in cells(args.ranks) if (m, r, s, args.epochs) not in have]
    mnist = load_mnist()  # to tensors once: indexing a formatted Dataset per cell is slow
    data = {split: (mnist[split]["pixel_values"], mnist[split]["labels"]) for split in ("train", "test")}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    new_file = not os.path.exists(out)
    with open(out, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for method, rank, seed in tqdm(todo, desc=f"mnist {args.model}"):
            start = time.perf_counter()
            accuracy = run_cell(args.model, method, rank, seed, args.epochs, data, limit=limit)
            row = {"model": args.model, "method": method, "rank": rank, "seed": seed, "epochs": args.epochs,
                   "test_accuracy": f"{accuracy:.4f}", "seconds": f"{time.perf_counter() - start:.1f}"}
            writer.writerow(row)
            fh.flush()
            done.append(row)
    rows = [r for r in done if int(r["epochs"]) == args.epochs]
    print(f"{'method':<8} {'rank':>5} {'test acc (mean of seeds)':>26}")
    for method, rank in cells(args.ranks):
        accs = [float(r["test_accuracy"]) for r in rows if r["method"] == method and int(r["rank"]) == rank]
        if accs:
            print(f"{method:<8} {rank:>5} {100 * statistics.mean(accs):>25.2f}%  (n={len(accs)})")
    plot(rows, out[:-4] + ".png")
    return rows


if __name__ == "__main__":
    main()
