"""A character-level Llama trained from scratch on Shakespeare: validation loss vs feedback rank (experiment d).

    python -m benchmarks.shakespeare_lm           # bp and LDFA r = 64 over 3 seeds; r in {8, 32}, fixed, fa once
    python -m benchmarks.shakespeare_lm --tiny    # seconds

The model is a 2-layer Llama (hidden 128, 4 heads, SwiGLU 256) over the 83 characters of the
plays, trained on 128-character blocks with AdamW and a cosine schedule; the last 10% of the
text is validation. Every linear layer, ``lm_head`` included, gets LDFA's feedback. Cells
already in the CSV are skipped. Results: benchmarks/results/shakespeare_lm.csv and .png
(validation loss vs rank) and shakespeare_lm_curves.png (validation loss during training).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from ldfa_hf.metrics import Perplexity

from .data import load_shakespeare_chars
from .harness import LABELS, ResultTable, out_path, attach, mean_of, plot_curves, plot_rank_sweep, select, summary_table

FIELDS = ["method", "rank", "seed", "steps", "val_loss", "val_perplexity", "val_curve", "seconds"]
HEADLINE_RANK = 64


def build(vocab_size: int, block: int, tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers = (32, 64, 1) if tiny else (128, 256, 2)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=block))


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(mean loss in nats per character, perplexity), token-weighted, through the ``Perplexity`` metric."""
    metric = Perplexity()
    model.eval()
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        metric.add_batch(predictions=[model(input_ids=ids, labels=ids).loss.item()], references=[ids[:, 1:].numel()])
    model.train()
    result = metric.compute()
    return result["loss"], result["perplexity"]


def train_lm(method: str, rank: int, seed: int, steps: int, data, vocab_size: int, batch_size: int = 16,
             lr: float = 3e-3, eval_every: int = 100, val_blocks: int = 256, tiny: bool = False,
             config: dict | None = None) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    train, val = data["train"][:]["input_ids"], data["validation"][:val_blocks]["input_ids"]
    torch.manual_seed(seed)
    model = build(vocab_size, train.shape[1], tiny)
    plugin = attach(model, method, rank, seed, refresh_every=max(1, steps // 8), **(config or {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        ids = train[torch.randint(0, len(train), (batch_size,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if plugin is not None:
            plugin.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, validation_loss(model, val[:64])[0]))
    loss, perplexity = validation_loss(model, val)
    return {"val_loss": f"{loss:.4f}", "val_perplexity": f"{perplexity:.3f}",
            "val_curve": " ".join(f"{s}:{v:.4f}" for s, v in curve)}


def cells(ranks, seeds: int) -> list[tuple[str, int, bool]]:
    out = [("bp", 0, True), ("svd", HEADLINE_RANK, True)]
    out += [("svd", r, False) for r in ranks if r != HEADLINE_RANK]
    out += [("calibrated", HEADLINE_RANK, False), ("fixed", HEADLINE_RANK, False), ("fa", 0, False)]
    return out


def plot_val_curves(rows: list[dict], path: str) -> str:
    curves = {}
    for row in sorted(rows, key=lambda r: (r["method"] != "bp", r["method"], int(r["rank"]))):
        if row["seed"] != "0":
            continue
        label = LABELS[row["method"]] + (f" r={row['rank']}" if row["method"] in ("svd", "calibrated", "fixed") else "")
        curves[label] = [(int(p.split(":")[0]), float(p.split(":")[1])) for p in row["val_curve"].split()]
    return plot_curves(curves, path, "Shakespeare char-level Llama: validation loss (seed 0)",
                       ylabel="validation loss (nats/char)", xlabel="training step", window=1)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seeds", type=int, default=3, help="seeds for bp and LDFA r=64")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/shakespeare_lm.csv; --tiny: a temp folder)")
    parser.add_argument("--refit-every", type=int, default=None, help="LDFAConfig.refit_every (svd: ALS refits)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    args.out = out_path(args.out, "shakespeare_lm.csv", args.tiny)
    extra = {"config": {"refit_every": args.refit_every}} if args.refit_every else {}
    if args.tiny:
        args.ranks, args.seeds, args.steps = [8, 64], 1, 4
        extra.update(eval_every=2, val_blocks=8, tiny=True)
    data, vocab = load_shakespeare_chars(block=32 if args.tiny else 128)
    table = ResultTable(args.out, FIELDS, key=["method", "rank", "seed", "steps"])
    todo = [{"method": m, "rank": r, "seed": s, "steps": args.steps}
            for m, r, headline in cells(args.ranks, args.seeds) for s in range(args.seeds if headline else 1)]
    todo.sort(key=lambda c: c["seed"])
    table.run(todo, lambda c: train_lm(c["method"], c["rank"], c["seed"], c["steps"], data, len(vocab), **extra),
              desc="shakespeare lm")
    rows = table.select(steps=args.steps)
    print(summary_table(rows, cells(args.ranks, args.seeds), column="val_loss", scale=1.0, unit="", digits=4))
    bp, _ = mean_of(rows, "val_loss", method="bp")
    if bp is not None:
        for rank in sorted({int(r["rank"]) for r in select(rows, method="svd")}):
            loss, _ = mean_of(rows, "val_loss", method="svd", rank=rank)
            print(f"LDFA r={rank}: validation loss {100 * (loss / bp - 1):+.1f}% vs bp (perplexity ×{math.exp(loss - bp):.3f})")
    plot_rank_sweep(rows, args.out[:-4] + ".png", "Shakespeare char LM: validation loss vs rank", column="val_loss",
                    scale=1.0, ylabel="validation loss (nats/char)", headline_rank=HEADLINE_RANK)
    plot_val_curves(rows, args.out[:-4] + "_curves.png")
    return rows


if __name__ == "__main__":
    main()
