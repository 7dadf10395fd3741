"""Teacher–student (LDFA_SPEC §4.5): which feedback rank a task of dimensionality d needs.

A teacher ``y = U tanh(V x)`` with ``V`` of rank d; a student MLP with a bottleneck that
must find V's row space, which it can only do if its hidden layers receive at least d
dimensions of error.

    python -m benchmarks.teacher_student            # d in {2, 4, 8, 16}, 3 seeds
    python -m benchmarks.teacher_student --tiny     # seconds
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import ldfa_hf


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--tiny", action="store_true", help="one d, one seed, few steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.dims, args.seeds, args.steps = [2], 1, 30
    print(f"{'d':>3} {'method':>12} {'rank':>5} {'test nMSE (median of seeds)':>28}")
    for d in args.dims:
        cells = [("bp", d), ("svd", d), ("local", d), ("oja", d), ("fixed", d), ("svd", max(d // 2, 1)), ("oja", max(d // 2, 1))]
        for rule, rank in cells:
            losses = [run(rule, rank, d, seed=s, steps=args.steps) for s in range(args.seeds)]
            print(f"{d:>3} {rule:>12} {rank:>5} {statistics.median(losses):>28.5f}", flush=True)


if __name__ == "__main__":
    main()
