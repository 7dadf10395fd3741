"""Transfer a pretrained ConvNeXt to new classes: fine-tuning with bp, svd, calibrated and fixed feedback.

    python -m benchmarks.convnext_transfer          # 3 seeds per method, about 10 minutes on 2 cores
    python -m benchmarks.convnext_transfer --tiny   # seconds

No pretrained ConvNeXt installs offline, so one is made here: trained with backprop on MNIST
digits 0–4 (cached under the data cache), then its head is replaced and the whole network is
fine-tuned on digits 5–9. That is the fine-tuning situation the ``calibrated`` rule is for (docs/METHOD.md §3):
the weights were shaped by another task, so their top singular directions need not carry the
new task's error. Results: benchmarks/results/convnext_transfer.csv.
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import cache_dir, load_mnist
from .harness import ResultTable, out_path, summary_table, train_classifier

FIELDS = ["method", "rank", "seed", "epochs", "train_examples", "test_accuracy", "seconds"]
METHODS = (("bp", 0), ("svd", 10), ("calibrated", 10), ("fixed", 10))
PRETRAIN_EPOCHS = 2


def build(num_labels: int = 5) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=1, patch_size=4, image_size=28, hidden_sizes=[32, 64], depths=[2, 2], num_stages=2,
        num_labels=num_labels))


def digits(split, low: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of digits low … low + 4, labels shifted to 0 … 4."""
    y = torch.as_tensor(split["labels"][:])
    keep = torch.nonzero((y >= low) & (y < low + 5)).flatten()[:limit]
    x = split.select(keep.tolist())["pixel_values"][:]  # format only the images used
    return torch.as_tensor(x), y[keep] - low


def pretrained(mnist, examples: int | None, epochs: int, tiny: bool) -> dict:
    """Backprop weights for digits 0–4, trained once and cached."""
    path = cache_dir() / f"convnext_digits04_{'tiny' if tiny else f'e{epochs}'}.safetensors"
    if path.exists():
        return load_file(path)
    torch.manual_seed(1234)
    model = build()
    result = train_classifier(model, digits(mnist["train"], 0, examples), digits(mnist["test"], 0, examples),
                              "bp", 0, 1234, epochs)
    print(f"pretrained on digits 0-4: test accuracy {100 * result['accuracy']:.2f}%")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return state


def transfer_model(state: dict, seed: int) -> nn.Module:
    """The pretrained body with a freshly initialised 5-way head (seeded)."""
    torch.manual_seed(seed)
    model = build()
    body = {k: v for k, v in state.items() if not k.startswith("classifier")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith("classifier") for k in missing)
    return model


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs on digits 5-9")
    parser.add_argument("--train-examples", type=int, default=5000, help="fine-tuning examples of digits 5-9")
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/convnext_transfer.csv; --tiny: a temp folder)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    args.out = out_path(args.out, "convnext_transfer.csv", args.tiny)
    pretrain_examples, pretrain_epochs, test_limit = None, PRETRAIN_EPOCHS, None
    if args.tiny:
        args.seeds, args.epochs, args.train_examples = 1, 1, 256
        pretrain_examples, pretrain_epochs, test_limit = 256, 1, 256
    mnist = load_mnist()
    state = pretrained(mnist, pretrain_examples, pretrain_epochs, args.tiny)
    train = digits(mnist["train"], 5, args.train_examples)
    test = digits(mnist["test"], 5, test_limit)
    table = ResultTable(args.out, FIELDS, key=["method", "rank", "seed", "epochs", "train_examples"])
    common = {"epochs": args.epochs, "train_examples": len(train[1])}

    def run(cell: dict) -> dict:
        model = transfer_model(state, cell["seed"])
        result = train_classifier(model, train, test, cell["method"], cell["rank"], cell["seed"], args.epochs)
        return {"test_accuracy": f"{result['accuracy']:.4f}"}

    todo = [dict(common, method=m, rank=r, seed=s) for s in range(args.seeds) for m, r in METHODS]
    table.run(todo, run, desc="convnext transfer")
    rows = table.select(**common)
    print(summary_table(rows, [(m, r, True) for m, r in METHODS]))
    return rows


if __name__ == "__main__":
    main()
