"""``ldfa-hf demo``: a wide MLP on scikit-learn's digits, backprop and LDFA side by side.

    ldfa-hf demo                    # about 2 minutes on 2 CPU cores; writes ./ldfa_demo.png
    ldfa-hf demo --epochs 5 --out /tmp/demo

Self-contained (the library's only training loop): the digits ship with scikit-learn and
both runs see the same initial weights and the same batches in the same order. The model
is where LDFA's saving is real at this size: hidden layers of width 1024, whose backward
``δ W`` (N·m·n) LDFA replaces by ``(δ P) Q`` (N·r·(m+n)). On small transformers (a ViT
of width 256 on 8×8 images) the attention, norms and activations take most of the step
and the saving does not show; `benchmarks/results/RESULTS.md` has the measured cases.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from .config import LDFAConfig
from .plugin import wrap


def digits(seed: int = 0):
    """8×8 digits scaled to [0, 1], split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def wide_mlp(seed: int, width: int, depth: int) -> nn.Module:
    """``depth`` hidden layers of ``width`` with GELU, on the flattened 8×8 image."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, width), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, plugin, epochs: int, batch_size: int,
        seed: int) -> tuple[list[float], list[float]]:
    """Cross-entropy over seeded shuffles, whole batches only; ``plugin.step()`` after every optimizer
    step. Returns the per-step losses and step times (forward, backward, optimizer and LDFA)."""
    order_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(y) // batch_size
    curve, step_s = [], []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=order_gen)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            output = model(x[idx])
            loss = nn.functional.cross_entropy(getattr(output, "logits", output), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if plugin is not None:
                plugin.step()
            step_s.append(time.perf_counter() - t0)
            curve.append(loss.item())
    return curve, step_s


def train(method: str, args) -> dict:
    """AdamW + cross-entropy; LDFA's SVD refreshes every half epoch (``refresh_every="auto"``)."""
    (x, y), (x_test, y_test) = digits()
    if args.tiny:
        x, y = x[:256], y[:256]
    model = wide_mlp(args.seed, args.width, args.depth)
    plugin = None
    if method == "ldfa":
        plugin = wrap(model, LDFAConfig(rank=args.rank, seed=args.seed))
        plugin.steps_per_epoch = len(y) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    curve, step_s = fit(model, x, y, optimizer, plugin, args.epochs, args.batch_size, args.seed)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    return {"method": method, "accuracy": accuracy, "curve": curve, "plugin": plugin,
            "step_s": statistics.mean(step_s[5:] or step_s)}  # the mean: refits and refreshes included


def plot(results: list[dict], path: str) -> str | None:
    """Training-loss curves (moving average); skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        ys = r["curve"]
        smooth = [statistics.mean(ys[max(0, i - 9):i + 1]) for i in range(len(ys))]
        ax.plot(smooth, label=f"{r['label']} (test acc {100 * r['accuracy']:.1f}%)", lw=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.set_title("wide MLP on digits: backprop vs LDFA")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ldfa-hf demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="folder for the plot (ldfa_demo.png)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run, for the tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.width = 1, 64
    results = []
    for method in ("bp", "ldfa"):
        result = train(method, args)
        result["label"] = "backprop" if method == "bp" else f"LDFA svd r={args.rank}"
        results.append(result)
    bp_time = results[0]["step_s"]
    print(f"{'method':<16} {'test acc':>9} {'step (ms)':>10} {'speed-up':>9}")
    for r in results:
        print(f"{r['label']:<16} {100 * r['accuracy']:>8.1f}% {1000 * r['step_s']:>10.1f} {bp_time / r['step_s']:>8.2f}x")
    results[1]["plugin"].summary()
    where = plot(results, os.path.join(args.out, "ldfa_demo.png"))
    if where:
        print(f"loss curves written to {where}")
    bp, ldfa = results
    print(f"demo: backprop {100 * bp['accuracy']:.1f}% | LDFA {100 * ldfa['accuracy']:.1f}% | "
          f"step speed-up {bp['step_s'] / ldfa['step_s']:.2f}x")
    return results


if __name__ == "__main__":
    main()
