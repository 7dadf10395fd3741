"""How much of backprop's input gradient can a fixed rank-r feedback keep on a batch it has not seen?

    python -m benchmarks.minilm_subspace            # pretrained MiniLM, Python-doc task, about a minute
    python -m benchmarks.minilm_subspace --tiny     # seconds

For every linear layer of pretrained MiniLM (full fine-tuning, new 6-way head) the exact output
errors δ of a few batches are recorded; factors are fitted on batch 0 (or on batches 2–9 pooled)
and scored on batch 1 by the share of the input gradient they keep, ``1 − ‖δW − δPQ‖² / ‖δW‖²``:

- ``errors``: P = top-r subspace of the output errors, Q = PᵀW (the error-subspace form);
- ``regression``: V = top-r eigenvectors of the input-gradient covariance, P = WV, Q = Vᵀ
  (the reduced-rank regression, the ``calibrated`` rule's default);
- ``own batch``: the regression fitted on batch 1 itself (the best any rank-r feedback can do there).

This is the measurement behind the ``calibrated`` rule's choices (docs/METHOD.md §3). Exact SVDs
here, not the rule's sketch: the question is what the best fit keeps, not how well it is found.
Results: benchmarks/results/minilm_subspace.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch

from .harness import out_path
from .minilm_genres import model_for, num_labels, tokenized


def exact_errors(model, batch: dict) -> dict[str, torch.Tensor]:
    """Output error of every linear layer (samples × m, float64) under plain backprop."""
    errors, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def record(mod, args, out, name=name):
                out.register_hook(lambda g: errors.__setitem__(name, g.reshape(-1, g.shape[-1]).detach().double()))
            handles.append(module.register_forward_hook(record))
    try:
        model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return errors


def top(rows: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r right singular vectors of a samples × features matrix (features × r)."""
    return torch.linalg.svd(rows, full_matrices=False).Vh[:r].T


def kept(delta: torch.Tensor, W: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> float:
    exact = delta @ W
    return 1.0 - float((exact - delta @ P @ Q).norm() ** 2 / exact.norm() ** 2)


def measure(task: str, ranks, pooled: int, tiny: bool) -> list[dict]:
    torch.manual_seed(0)
    data = tokenized(task, 16 * (pooled + 2), 16, 256, 32 if tiny else 64)
    model = model_for("full", tiny, num_labels(data))
    model.train()
    train = data["train"].with_format("torch")

    def batch(start: int, count: int = 1) -> dict:
        rows = train[16 * start:16 * (start + count)]
        return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "labels": rows["label"]}

    fit, test, pool = exact_errors(model, batch(0)), exact_errors(model, batch(1)), exact_errors(model, batch(2, pooled))
    weights = {n: m.weight.detach().double() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = []
    for r in ranks:
        scores: dict[str, list[float]] = {}
        for name, W in weights.items():
            if name not in test or min(W.shape) <= r:
                continue  # a layer at full rank (the head) is exact under every form
            d = test[name]
            for source, errors in (("1 batch", fit[name]), (f"{pooled} batches", pool[name])):
                P = top(errors, r)
                scores.setdefault(f"errors, {source}", []).append(kept(d, W, P, P.T @ W))
                V = top(errors @ W, r)
                scores.setdefault(f"regression, {source}", []).append(kept(d, W, W @ V, V.T))
            V = top(d @ W, r)
            scores.setdefault("regression, own batch", []).append(kept(d, W, W @ V, V.T))
        out += [{"task": task, "rank": r, "fit": key, "layers": len(values), "kept": f"{statistics.mean(values):.4f}"}
                for key, values in scores.items()]
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pydoc", choices=["genres", "pydoc"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--pooled", type=int, default=8, help="batches pooled for the second fit")
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/minilm_subspace.csv; --tiny: a temp folder)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    args.out = out_path(args.out, "minilm_subspace.csv", args.tiny)
    if args.tiny:
        args.ranks, args.pooled = [4], 2
    rows = measure(args.task, args.ranks, args.pooled, args.tiny)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'rank':>4}  {'factors fitted on':<26} {'input gradient kept on an unseen batch':>40}")
    for row in rows:
        print(f"{row['rank']:>4}  {row['fit']:<26} {100 * float(row['kept']):>39.1f}%")
    return rows


if __name__ == "__main__":
    main()
