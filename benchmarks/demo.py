"""The one-command demo: a small ViT on scikit-learn's digits, backprop vs LDFA (r = 10).

    ldfa-hf demo                 # about a minute on 2 CPU cores
    ldfa-hf demo --epochs 1      # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import ldfa_hf


def digits(seed: int = 0):
    """8×8 digits scaled to [0, 1], split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def small_vit(seed: int, hidden: int = 256, layers: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=2 * hidden, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def train(method: str, epochs: int, batch_size: int, seed: int, rank: int, tiny: bool = False) -> dict:
    (x_train, y_train), (x_test, y_test) = digits()
    if tiny:
        x_train, y_train = x_train[:256], y_train[:256]
    model = small_vit(seed, *((32, 1) if tiny else (256, 4)))
    steps_per_epoch = len(y_train) // batch_size
    config = ldfa_hf.LDFAConfig(rank=rank, rule="svd", seed=seed,
                                refresh_every=max(1, steps_per_epoch // 2))  # the authors refresh every half epoch
    plugin = None if method == "bp" else ldfa_hf.wrap(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    step_times, curve = [], []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            loss = model(pixel_values=x_train[idx], labels=y_train[idx]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if plugin is not None:
                plugin.step()
            step_times.append(time.perf_counter() - t0)
            curve.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = float((model(pixel_values=x_test).logits.argmax(-1) == y_test).float().mean())
    return {"method": method, "accuracy": accuracy, "step_s": statistics.median(step_times[5:] or step_times),
            "curve": curve, "plugin": plugin}


def plot(results: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        window = 10
        smooth = [statistics.mean(r["curve"][max(0, i - window):i + 1]) for i in range(len(r["curve"]))]
        ax.plot(smooth, label=f"{r['label']} (test acc {100 * r['accuracy']:.1f}%)")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    ax.set_title("ViT on digits: backprop vs LDFA")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="ldfa_demo.png", help="where to write the loss-curve plot")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run, for the tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs = 1
    results = []
    for method in ("bp", "ldfa"):
        result = train(method, args.epochs, args.batch_size, args.seed, args.rank, args.tiny)
        result["label"] = "backprop" if method == "bp" else f"LDFA svd r={args.rank}"
        results.append(result)
    bp_time = results[0]["step_s"]
    print(f"{'method':<16} {'test acc':>9} {'step (ms)':>10} {'speed-up':>9}")
    for r in results:
        print(f"{r['label']:<16} {100 * r['accuracy']:>8.1f}% {1000 * r['step_s']:>10.1f} {bp_time / r['step_s']:>8.2f}x")
    results[1]["plugin"].summary()
    where = plot(results, args.plot)
    if where:
        print(f"loss curves written to {where}")
    return results


if __name__ == "__main__":
    main()
