"""How much of the LoRA gradient survives LDFA on a pretrained LLM (SmolLM2-135M-Instruct).

A cheap proxy for fine-tuning accuracy, seconds per configuration instead of minutes: after a
few exact LoRA steps on a task (``arith``, or ``--task``; so that ``lora_B`` is not zero), each
configuration is attached, takes its first step(s) on other batches (its calibration), and the
cosine between its LoRA gradient and backprop's on a held-out batch is measured — over all
adapters and by depth (blocks 0-9, 10-19, 20-29 of 30).

    python -m benchmarks.llm_gradients --methods "calibrated r32" "calibrated r32 exact0.67" "floor exact0.67"
    python -m benchmarks.llm_gradients --tiny
"""

from __future__ import annotations

import argparse
import csv
import os
import re

import torch

import ldfa_hf

from . import floor  # noqa: F401  (registers rule="floor": zero feedback, the residual stream alone)
from .harness import out_path
from .llm_sft import Encoder, base_model, config_for, task_examples, with_lora

FIELDS = ["method", "cos_all", "cos_low", "cos_mid", "cos_top"]


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def cosine(a: dict, b: dict, names) -> float:
    x = torch.cat([a[n].flatten() for n in names])
    y = torch.cat([b[n].flatten() for n in names])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def measure(methods, tiny: bool, warm_steps: int = 6, batch_size: int = 8, task: str = "arith") -> list[dict]:
    base, tok = base_model(tiny)
    enc = Encoder(tok)
    examples = task_examples(task, 400, seed=7)
    torch.manual_seed(0)
    model = with_lora(base, "lora", 0).train()  # from_pretrained returns eval mode: no statistics there
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for i in range(warm_steps):  # exact LoRA steps first: with lora_B = 0 the adapters' A has no gradient
        model(**enc.batch(examples[i * batch_size:(i + 1) * batch_size])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    held = enc.batch(examples[200:200 + batch_size])
    model(**held).loss.backward()
    exact = lora_grads(model)
    model.zero_grad()
    layers = base.config.num_hidden_layers
    depth = {n: int(re.search(r"layers\.(\d+)\.", n).group(1)) * 3 // layers for n in exact}
    rows = []
    for method in methods:
        plugin = ldfa_hf.wrap(model, config_for(method, layers))
        for j in range(3):  # its first steps on other batches: calibration, subspace, ...
            model(**enc.batch(examples[100 + j * batch_size:100 + (j + 1) * batch_size])).loss.backward()
            model.zero_grad()
            plugin.step()
        model(**held).loss.backward()
        got = lora_grads(model)
        model.zero_grad()
        plugin.reset_statistics()
        plugin.detach()
        row = {"method": method, "cos_all": f"{cosine(got, exact, list(exact)):.3f}"}
        for g, key in enumerate(("cos_low", "cos_mid", "cos_top")):
            names = [n for n in exact if depth[n] == g]
            row[key] = f"{cosine(got, exact, names):.3f}" if names else ""
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=[
        "bp", "calibrated r32", "streaming r32", "svd r32", "calibrated r32 head", "calibrated r256 head",
        "floor head", "calibrated r32 exact0.5", "calibrated r32 exact0.67", "streaming r32 exact0.67",
        "svd r32 exact0.67", "fixed r32 exact0.67", "floor exact0.67"])
    parser.add_argument("--task", default="arith", choices=["arith", "sort", "pydoc"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/llm_gradients.csv, or "
                                                    "llm_gradients_<task>.csv; --tiny: a temp folder)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.methods = args.methods if argv and "--methods" in argv else ["bp", "calibrated r4", "floor exact0.5"]
    rows = measure(args.methods, args.tiny, task=args.task)
    name = "llm_gradients.csv" if args.task == "arith" else f"llm_gradients_{args.task}.csv"
    path = out_path(args.out, name, args.tiny)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
