"""A plain accelerate training loop with LDFA, for one process or many.

    accelerate launch integrations/accelerate_ddp.py                                  # your accelerate config
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        integrations/accelerate_ddp.py --tiny                                           # two CPU processes (gloo)
    torchrun --nproc_per_node 2 integrations/accelerate_ddp.py --tiny

Every process holds identical feedback factors: they start from the same seed (and are
broadcast from rank 0 once), and ``plugin.step()`` all-reduces the statistics first.
``--save-dir`` writes each rank's factors and the final weights, for checking that.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

import ldfa_hf


def synthetic_text(n: int, seq: int, vocab: int, seed: int = 0) -> TensorDataset:
    """Token sequences whose label is which quarter of the vocabulary dominates them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    noise = torch.randint(0, vocab, (n, seq), generator=g)
    signal = labels[:, None] * (vocab // 4) + torch.randint(0, vocab // 4, (n, seq), generator=g)
    ids = torch.where(torch.rand(n, seq, generator=g) < 0.5, signal, noise)
    return TensorDataset(ids, labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="svd")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--calibrate-every", type=int, default=ldfa_hf.LDFAConfig.calibrate_every,
                        help="calibrated rule: one exact step in this many")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    set_seed(args.seed)
    width, seq, vocab = (32, 16, 64) if args.tiny else (128, 64, 512)
    config = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * width, max_position_embeddings=seq, num_labels=4,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule=args.rule, rank=args.rank, seed=args.seed,
                                                          calibrate_every=args.calibrate_every))  # LDFA
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = synthetic_text(args.steps * args.batch_size * accelerator.num_processes, seq, vocab)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    for step, (ids, labels) in enumerate(loader):
        loss = model(input_ids=ids, labels=labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        plugin.step()                                                                                # LDFA
        if step % 50 == 0 or step == len(loader) - 1:
            accelerator.print(f"step {step} loss {loss.item():.4f}")

    accelerator.print(plugin.summary(print_fn=None).splitlines()[-1])
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        rank = accelerator.process_index
        factors = {k: v.detach().cpu().contiguous() for k, v in plugin.state_dict().items()}
        save_file(factors, os.path.join(args.save_dir, f"factors_rank{rank}.safetensors"))
        weights = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, os.path.join(args.save_dir, f"weights_rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
