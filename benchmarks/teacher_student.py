"""Teacher–student (docs/METHOD.md §4, invariant 5): which feedback rank a task of dimensionality d needs.

A teacher ``y = U tanh(V x)`` with ``V`` of rank d; a student MLP with a bottleneck that
must find V's row space, which it can only do if its hidden layers receive at least d
dimensions of error.

    python -m benchmarks.teacher_student            # d in {2, 4, 8, 16}; bp, svd and fixed at r = d over 3 seeds
    python -m benchmarks.teacher_student --tiny     # seconds

For each d: svd and fixed feedback at ranks d/4, d/2, d, 2d, local and oja at r = d. A rank
"matches backprop" when its mean test error is within ``matches()`` of backprop's. Cells
already in the CSV are skipped. Results: benchmarks/results/teacher_student.csv and .png.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import ldfa_hf

from .harness import ResultTable, _pyplot, mean_of, out_path, save_figure

FIELDS = ["d", "method", "rank", "seed", "steps", "test_nmse", "seconds"]


def matches(loss: float, bp: float) -> bool:
    """Backprop-level: within 4× of bp's normalised MSE, or 0.003 above it (both ≪ fixed feedback's)."""
    return loss <= max(4 * bp, bp + 0.003)


def teacher_data(d: int, n_in: int = 64, out: int = 16, n_train: int = 2048, n_test: int = 1024):
    g = torch.Generator().manual_seed(100 + d)
    V = 2 * torch.randn(d, n_in, generator=g) / n_in**0.5
    U = torch.randn(out, d, generator=g) / d**0.5

    def teacher(x):
        return torch.tanh(x @ V.T) @ U.T

    x_train, x_test = torch.randn(n_train, n_in, generator=g), torch.randn(n_test, n_in, generator=g)
    return (x_train, teacher(x_train)), (x_test, teacher(x_test))


def run(rule: str, rank: int, d: int, seed: int = 0, steps: int = 800, hidden: int = 32, lr: float = 3e-3) -> float:
    """Normalised test MSE (MSE / mean y²) of a student trained with ``rule`` at ``rank``."""
    (x_train, y_train), (x_test, y_test) = teacher_data(d)
    torch.manual_seed(seed)
    n_in, out = x_train.shape[1], y_train.shape[1]
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out))
    plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule=rule, rank=rank, refresh_every=None, seed=seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=gen)
        loss = ((model(x_train[idx]) - y_train[idx]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        plugin.step()
    with torch.no_grad():
        return float(((model(x_test) - y_test) ** 2).mean() / (y_test**2).mean())


def cells(d: int, seeds: int) -> list[dict]:
    ranks = sorted({max(1, d // 4), max(1, d // 2), d, 2 * d})
    out = [("bp", d, seeds), ("svd", d, seeds), ("fixed", d, seeds), ("local", d, 1), ("oja", d, 1)]
    out += [(rule, r, 1) for rule in ("svd", "fixed") for r in ranks if r != d]
    return [{"d": d, "method": m, "rank": r, "seed": s} for m, r, n in out for s in range(n)]


def plot(rows: list[dict], path: str) -> str:
    plt = _pyplot()
    dims = sorted({int(r["d"]) for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3.2), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for rule, style in (("svd", "o-"), ("fixed", "x--")):
            ranks = sorted({int(r["rank"]) for r in rows if r["d"] == str(d) and r["method"] == rule})
            ax.plot(ranks, [mean_of(rows, "test_nmse", d=d, method=rule, rank=k)[0] for k in ranks], style, label=rule)
        bp, _ = mean_of(rows, "test_nmse", d=d, method="bp")
        ax.axhline(bp, color="k", ls="--", lw=1, label="bp")
        ax.axvline(d, color="grey", lw=0.5)
        ax.set(xscale="log", yscale="log", title=f"d = {d}", xlabel="feedback rank r")
        ticks = sorted({int(r["rank"]) for r in rows if r["d"] == str(d)})
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
    axes[0][0].set_ylabel("test error (normalised MSE)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/teacher_student.csv; --tiny: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="one d, one seed, few steps")
    args = parser.parse_args(argv)
    args.out = out_path(args.out, "teacher_student.csv", args.tiny)
    if args.tiny:
        args.dims, args.seeds, args.steps = [2], 1, 30
    table = ResultTable(args.out, FIELDS, key=["d", "method", "rank", "seed", "steps"])
    todo = [dict(c, steps=args.steps) for d in args.dims for c in cells(d, args.seeds)]
    table.run(todo, lambda c: {"test_nmse": f"{run(c['method'], c['rank'], c['d'], c['seed'], c['steps']):.6f}"},
              desc="teacher-student")
    rows = table.select(steps=args.steps)
    print(f"{'d':>3} {'bp':>9} {'svd r=d':>9} {'fixed r=d':>10} {'local r=d':>10} {'oja r=d':>9} "
          f"{'smallest svd rank within 4x of bp':>34} {'smallest fixed rank':>20}")
    for d in args.dims:
        value = {m: mean_of(rows, "test_nmse", d=d, method=m, rank=d)[0] for m in ("bp", "svd", "fixed", "local", "oja")}
        smallest = {}
        for rule in ("svd", "fixed"):
            ranks = sorted({int(r["rank"]) for r in rows if r["d"] == str(d) and r["method"] == rule})
            ok = [k for k in ranks if matches(mean_of(rows, "test_nmse", d=d, method=rule, rank=k)[0], value["bp"])]
            ratio = (mean_of(rows, "test_nmse", d=d, method=rule, rank=ok[0])[0] / value["bp"]) if ok else 0.0
            smallest[rule] = f"{ok[0]} ({ratio:.1f}x bp's error)" if ok else f"none ≤ {max(ranks)}"
        print(f"{d:>3} " + " ".join(f"{value[m]:>9.5f}" for m in value) + f" {smallest['svd']:>34} {smallest['fixed']:>20}")
    plot(rows, args.out[:-4] + ".png")
    return rows


if __name__ == "__main__":
    main()
