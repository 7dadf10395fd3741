"""The one-command demo: a small ViT on scikit-learn's digits, backprop vs LDFA (r = 10).

    ldfa-hf demo                 # about 3 minutes on 2 CPU cores
    ldfa-hf demo --epochs 1      # quicker
"""

from __future__ import annotations

import argparse

import torch

from .harness import plot_curves, train_classifier


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
    train_split, test_split = digits()
    if tiny:
        train_split = (train_split[0][:256], train_split[1][:256])
    model = small_vit(seed, *((32, 1) if tiny else (256, 4)))
    result = train_classifier(model, train_split, test_split, "bp" if method == "bp" else "svd", rank, seed, epochs,
                              batch_size=batch_size, lr=2e-3, weight_decay=0.05)
    return dict(result, method=method)


def plot(results: list[dict], path: str) -> str | None:
    try:
        curves = {f"{r['label']} (test acc {100 * r['accuracy']:.1f}%)": r["curve"] for r in results}
        return plot_curves(curves, path, "ViT on digits: backprop vs LDFA", window=10)
    except ImportError:  # matplotlib is optional for the demo
        return None


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
