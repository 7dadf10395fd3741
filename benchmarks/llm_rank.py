"""Does the feedback rank a pretrained LLM needs track the number of classes? (SmolLM2-135M as a
sequence classifier with 2, 6 and 36 classes; LoRA and full fine-tuning.)

The paper's thesis: the error a network sends down lives in a space about as wide as its output,
so rank r ≈ classes suffices. Two measurements per task, both cheap (no training run):

- **the error's width**: in an exact backward, the residual stream's error at each block's output
  (every token of 64 examples) and the number of singular directions holding 90% of its energy
  (``r90``); if the thesis holds on an LLM, r90 stays near the number of classes at every depth;
- **gradient fidelity**: LDFA on every linear layer (nothing exact) at ranks 1–64, the cosine
  between its gradient and backprop's on a held-out batch, over the trainable parameters of all
  blocks (the head trains exactly whatever the feedback, and would dominate) and per block (as
  ``llm_gradients`` does for SFT), after a few exact steps (so the head and the adapters are not
  at their initialisation) and three steps of the rule's own statistics.

    python -m benchmarks.llm_rank                       # every task, both fine-tuning kinds
    python -m benchmarks.llm_rank --tasks sentiment --pefts lora --ranks 2 8
    python -m benchmarks.llm_rank --tiny
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch

import ldfa_hf

from .harness import ResultTable, _pyplot, out_path, save_figure
from .llm_gradients import cosine, lora_grads as gradients
from .llm_classify import LR, classifier, encode, loss_and_correct, task_data, with_peft
from .llm_sft import blocks_of

FIELDS = ["task", "classes", "peft", "rule", "rank", "block", "value"]
TASKS = ("sentiment", "topics", "plays")


def r90(error: torch.Tensor) -> int:
    """How many singular directions hold 90% of the energy of the rows of ``error`` (tokens × d)."""
    s = torch.linalg.svdvals(error.double())
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    return int((energy < 0.9).sum()) + 1


def error_widths(model, batch: dict, labels, task: str) -> list[int]:
    """r90 of the residual stream's error at the output of every block, real tokens only."""
    captured: dict[int, torch.Tensor] = {}
    handles = [block.register_full_backward_hook(
        lambda module, grad_in, grad_out, i=i: captured.__setitem__(i, grad_out[0].detach()))
        for i, block in enumerate(blocks_of(model))]
    try:
        loss_and_correct(model, batch, labels, task)[0].backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    mask = batch["attention_mask"].bool()
    return [r90(captured[i][mask]) for i in sorted(captured)]


def measure(task: str, peft: str, rules, ranks, tiny: bool, warm_steps: int = 6, batch_size: int = 8,
            width_batch: int = 64) -> list[dict]:
    """The rows of one task and fine-tuning kind: r90 per block (on ``width_batch`` examples, so
    that the top block's width, one scored token a row, is not capped by the batch), then per rule
    and rank the cosine over all blocks' trainable parameters (``block="blocks"``: the head, trained
    exactly whatever the feedback, and the embeddings are left out) and per block."""
    train, _, outputs = task_data(task, seed=7)
    base, tokenizer = classifier(tiny, outputs)
    model = with_peft(base, peft, seed=0).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[peft])
    batches = [encode(tokenizer, train[i * batch_size:(i + 1) * batch_size], task) for i in range(warm_steps + 4)]
    for batch, y in batches[:warm_steps]:  # exact steps first: the head and lora_B leave zero / their init
        loss_and_correct(model, batch, y, task)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held, held_y = batches[-1]
    common = {"task": task, "classes": outputs if task != "reward" else 1, "peft": peft}
    wide, wide_y = encode(tokenizer, train[-width_batch:], task)
    rows = [{**common, "rule": "r90", "rank": "", "block": str(i), "value": str(w)}
            for i, w in enumerate(error_widths(model, wide, wide_y, task))]
    loss_and_correct(model, held, held_y, task)[0].backward()
    exact = gradients(model)
    model.zero_grad(set_to_none=True)
    block_of = {n: int(m.group(1)) for n in exact if (m := re.search(r"layers\.(\d+)\.", n))}
    for rule in rules:
        for rank in ranks:
            plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule=rule, rank=rank, exact_top=0.0))
            for batch, y in batches[warm_steps:warm_steps + 3]:  # the rule's statistics, no optimizer step
                loss_and_correct(model, batch, y, task)[0].backward()
                model.zero_grad(set_to_none=True)
                plugin.step()
            loss_and_correct(model, held, held_y, task)[0].backward()
            got = gradients(model)
            model.zero_grad(set_to_none=True)
            plugin.detach()
            cell = {**common, "rule": rule, "rank": str(rank)}
            rows.append({**cell, "block": "blocks", "value": f"{cosine(got, exact, list(block_of)):.4f}"})
            for i in sorted(set(block_of.values())):
                names = [n for n in exact if block_of.get(n) == i]
                rows.append({**cell, "block": str(i), "value": f"{cosine(got, exact, names):.4f}"})
            print(f"{task} {peft} {rule} r{rank}: cosine over the blocks {rows[-len(set(block_of.values())) - 1]['value']}",
                  flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per task and fine-tuning kind, the error's width (r90) at the top block, two
    thirds and one third of the way up, and the bottom; then per rule the gradient cosine at each
    rank, over all blocks' trainable parameters / over the top third of the blocks."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["classes"], r["peft"]), []).append(r)
    ranks = sorted({int(r["rank"]) for r in rows if r["rank"]})
    rules = sorted({r["rule"] for r in rows if r["rule"] != "r90"})
    lines = ["| task | classes | fine-tuning | error width r90, top → bottom block | rule | "
             + " | ".join(f"r={k}" for k in ranks) + " |", "|---|---|---|---|---|" + "---|" * len(ranks)]
    for (task, classes, peft), cell in cells.items():
        widths = [int(r["value"]) for r in sorted((r for r in cell if r["rule"] == "r90"), key=lambda r: int(r["block"]))]
        n = len(widths)
        width = " → ".join(str(widths[i]) for i in (n - 1, 2 * n // 3, n // 3, 0)) if n else ""
        for rule in rules:
            mine = [r for r in cell if r["rule"] == rule]
            blocks = sorted({int(r["block"]) for r in mine if r["block"].isdigit()})
            top = blocks[len(blocks) * 2 // 3:]

            def at(rank: int) -> str:
                here = [r for r in mine if r["rank"] == str(rank)]
                whole = next((r["value"] for r in here if r["block"] == "blocks"), None)
                upper = [float(r["value"]) for r in here if r["block"].isdigit() and int(r["block"]) in top]
                return f"{float(whole):.2f} / {statistics.mean(upper):.2f}" if whole and upper else ""

            lines.append(f"| {task} | {classes} | {peft} | {width} | {rule} | " + " | ".join(at(k) for k in ranks) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """Left: r90 of the error by depth, one line per task and fine-tuning kind. Right: the gradient
    cosine against rank, one line per task, fine-tuning kind and rule."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cells = sorted({(r["task"], r["classes"], r["peft"]) for r in rows})
    for task, classes, peft in cells:
        depth = sorted((int(r["block"]), int(r["value"])) for r in rows
                       if (r["task"], r["peft"], r["rule"]) == (task, peft, "r90"))
        if depth:
            left.plot(*zip(*depth), marker=".", label=f"{task} ({classes} classes), {peft}")
        for rule in sorted({r["rule"] for r in rows if r["rule"] != "r90"}):
            points = sorted((int(r["rank"]), float(r["value"])) for r in rows if (r["task"], r["peft"], r["rule"])
                            == (task, peft, rule) and r["block"] == "blocks")
            if points:
                right.plot(*zip(*points), marker="o", ls="-" if peft == "lora" else "--",
                           label=f"{task} ({classes}), {peft}, {rule}")
    left.set(xlabel="block", ylabel="r90 of the residual error (directions)", yscale="log",
             title="width of the error an exact backward sends")
    right.set(xlabel="feedback rank r", ylabel="cosine to backprop's gradient (all blocks)", xscale="log",
              title="LDFA on every layer: gradient fidelity")
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    return save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--pefts", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--rules", nargs="+", default=["calibrated", "svd"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/llm_rank.csv; --tiny: a temp folder)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.ranks = args.ranks[:2]
    path = out_path(args.out, "llm_rank.csv", args.tiny)
    results = ResultTable(path, FIELDS, key=["task", "peft", "rule", "rank", "block"])
    for task in args.tasks:
        for peft in args.pefts:
            if not results.select(task=task, peft=peft):  # a finished cell is not measured again
                for row in measure(task, peft, args.rules, args.ranks, args.tiny):
                    results.add(row)
    print(table(results.rows))
    print("plot:", plot(results.rows, path.replace(".csv", ".png")))
    print(f"results: {path}")
    return results.rows


if __name__ == "__main__":
    main()
