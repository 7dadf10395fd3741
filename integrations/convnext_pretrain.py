"""Train a small ConvNeXt image classifier from scratch with the Trainer and LDFA.

ConvNeXt mixes strided ``Conv2d`` stems (targeted), depthwise convolutions (kept exact)
and pointwise ``Linear`` layers (targeted). Data: scikit-learn's 8×8 digits, which are
always installed.

    python integrations/convnext_pretrain.py --rank 10 --epochs 20
    python integrations/convnext_pretrain.py --tiny
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from datasets import Dataset
from transformers import ConvNextConfig, ConvNextForImageClassification, Trainer, TrainingArguments, set_seed

import ldfa_hf


def digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images.astype(np.float32) / 16.0)[:, None]  # 1 × 8 × 8
    return Dataset.from_dict({"pixel_values": pixels, "labels": digits.target}).with_format("torch")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--rule", default="svd")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--output-dir", default="out/convnext_pretrain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.max_steps = 3

    set_seed(args.seed)
    sizes = [8, 16] if args.tiny else [32, 64]
    config = ConvNextConfig(num_channels=1, patch_size=2, image_size=8, hidden_sizes=sizes, depths=[1, 1] if args.tiny else [2, 2],
                            num_stages=2, num_labels=10, drop_path_rate=0.0)
    model = ConvNextForImageClassification(config)
    split = digits_dataset().train_test_split(test_size=0.2, seed=0)

    plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=args.rank, rule=args.rule, seed=args.seed))  # LDFA
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.05,
        save_strategy="no", logging_steps=50, report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=split["train"])
    ldfa_hf.LDFACallback(plugin).install(trainer)                              # LDFA, ahead of the reporters
    trainer.train()
    predictions = trainer.predict(split["test"])
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    print(f"accuracy {accuracy:.3f}  conv layers {sum(t.kind == 'conv2d' for t in plugin.targets.values())}  "
          f"ldfa steps {plugin.num_steps}")
    return accuracy


if __name__ == "__main__":
    main()
