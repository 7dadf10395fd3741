"""``ldfa-hf demo``: a wide MLP on scikit-learn's digits, backprop and LDFA side by side.

    ldfa-hf demo                    # 240 steps; see RUNTIME below; writes ./ldfa_demo.png
    ldfa-hf demo --epochs 10 --out /tmp/demo

Self-contained (the library's only training loop): the digits ship with scikit-learn and
both runs see the same initial weights and the same batches in the same order. The model
is where LDFA's saving is real at this size: four hidden layers of width 2048 and 512
images a step, whose backward ``δ W`` (N·m·n) LDFA replaces by ``(δ P) Q`` (N·r·(m+n)). On small transformers (a ViT
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

# what the default run took, and where (printed before it starts)
RUNTIME = "1 min 35 s on an idle 2-core x86 CPU (measured 2026-12-06, v0.2.0); longer on a busy one"
SPREAD_NOTE = 0.15  # per-round ratios spread wider than this (relative IQR) get a note: a busy machine


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


def fit(runs: list[tuple], x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
        seed: int) -> tuple[list[list[float]], list[list[float]]]:
    """Train every ``(model, optimizer, plugin or None)`` in ``runs`` side by side: the same
    seeded shuffles, whole batches only, one step of each in turn (the order alternating), so
    that the machine's drift hits all of them alike. ``plugin.step()`` follows each optimizer
    step. Returns per run the losses and the step times (forward, backward, optimizer, LDFA)."""
    order_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(y) // batch_size
    curves, times = [[] for _ in runs], [[] for _ in runs]
    for model, _, _ in runs:
        model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * steps_per_epoch, desc="demo", unit="step", disable=len(y) < 512,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=order_gen)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[start:start + batch_size]
            turn = range(len(runs)) if step % 2 == 0 else reversed(range(len(runs)))
            for i in turn:
                model, optimizer, plugin = runs[i]
                t0 = time.perf_counter()
                output = model(x[idx])
                loss = nn.functional.cross_entropy(getattr(output, "logits", output), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if plugin is not None:
                    plugin.step()
                times[i].append(time.perf_counter() - t0)
                curves[i].append(loss.item())
            step += 1
            bar.update(1)
            if step % 5 == 0:
                bar.set_postfix_str(" ".join(f"{name} {1000 * statistics.median(t[-10:]):.0f} ms"
                                             for name, t in zip(("backprop", "LDFA"), times)))
    bar.close()
    return curves, times


def train(args) -> list[dict]:
    """Backprop and LDFA from the same initial weights, side by side. Fused AdamW +
    cross-entropy; LDFA svd at rank ``args.rank``, its SVD refreshed every
    ``args.refresh_every`` steps (the library's half-epoch default would be every 2 steps on
    this 1,437-image set, and each refresh costs a few descent steps)."""
    (x, y), (x_test, y_test) = digits()
    if args.tiny:
        x, y = x[:256], y[:256]
    runs = []
    for method in ("bp", "ldfa"):
        model = wide_mlp(args.seed, args.width, args.depth)
        plugin = None
        if method == "ldfa":
            plugin = wrap(model, LDFAConfig(rank=args.rank, seed=args.seed, refresh_every=args.refresh_every))
        runs.append((model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, fused=True), plugin))
    curves, times = fit(runs, x, y, args.epochs, args.batch_size, args.seed)
    results = []
    for method, (model, _, plugin), curve, step_s in zip(("bp", "ldfa"), runs, curves, times):
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
        results.append({"method": method, "accuracy": accuracy, "curve": curve, "plugin": plugin,
                        "times": step_s, "step_s": statistics.mean(step_s[5:] or step_s)})  # refreshes included
    return results


def speedup(bp_times: list[float], ldfa_times: list[float], window: int = 10) -> tuple[float, float]:
    """The median over rounds of ``window`` steps of backprop's time over LDFA's in the same
    round (both ran side by side, so a busy machine slows both alike), and the rounds' relative
    spread (interquartile range over median). Means per round keep LDFA's refresh steps in."""
    rounds = [sum(bp_times[i:i + window]) / sum(ldfa_times[i:i + window])
              for i in range(5, len(bp_times) - window + 1, window)]
    if len(rounds) < 2:
        total = sum(bp_times) / sum(ldfa_times)
        return total, 0.0
    q = statistics.quantiles(rounds, n=4)
    middle = statistics.median(rounds)
    return middle, (q[2] - q[0]) / middle


def plot(results: list[dict], path: str) -> str | None:
    """Training loss against each run's own training clock (seconds spent in its steps), loss on
    a log scale; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in results:
        ys, clock, total = r["curve"], [], 0.0
        for t in r["times"]:
            total += t
            clock.append(total)
        smooth = [statistics.mean(ys[max(0, i - 9):i + 1]) for i in range(len(ys))]
        ax.plot(clock, smooth, label=f"{r['label']}: test acc {100 * r['accuracy']:.1f}%, {total:.0f} s", lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("training time, seconds (steps only; both runs side by side)")
    ax.set_ylabel("training loss (mean of the last 10 steps, log scale)")
    ax.set_title("wide MLP on digits: backprop vs LDFA", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ldfa-hf demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--rank", type=int, default=10, help="feedback rank (about the number of classes)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--refresh-every", type=int, default=50,
                        help="steps between the svd rule's SVD refreshes (half an epoch, the default, is 2 steps here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".", help="folder for the plot (ldfa_demo.png)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run, for the tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.width, args.batch_size = 1, 64, 64
    if not args.tiny:
        print(f"ldfa-hf demo: backprop and LDFA side by side, {args.epochs} epochs; {RUNTIME}", flush=True)
    results = train(args)
    for result in results:
        result["label"] = "backprop" if result["method"] == "bp" else f"LDFA svd r={args.rank}"
    bp, ldfa = results
    ratio, spread = speedup(bp["times"], ldfa["times"])
    print(f"{'method':<16} {'test acc':>9} {'step (ms)':>10}")
    for r in results:
        print(f"{r['label']:<16} {100 * r['accuracy']:>8.1f}% {1000 * r['step_s']:>10.1f}")
    results[1]["plugin"].summary()
    where = plot(results, os.path.join(args.out, "ldfa_demo.png"))
    if where:
        print(f"loss against time written to {where}")
    print(f"demo: backprop {100 * bp['accuracy']:.1f}% | LDFA {100 * ldfa['accuracy']:.1f}% | "
          f"step speed-up {ratio:.2f}x (median over rounds of 10 side-by-side steps)")
    if spread > SPREAD_NOTE:
        print(f"note: the rounds' speed-ups spread by {100 * spread:.0f}% (interquartile range): the machine was "
              "busy or its clock changed; run again on an idle machine for a steadier number")
    bp["speedup"], bp["spread"] = ratio, spread
    return results


if __name__ == "__main__":
    main()
