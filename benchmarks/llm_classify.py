"""Sequence classifiers and reward models on a pretrained LLM (SmolLM2-135M-Instruct as
``AutoModelForSequenceClassification``): plain LoRA vs LoRA + LDFA, in lockstep.

Both models start from the same pretrained weights, the same head and the same LoRA
initialisation, see the same batches, and take one optimizer step each in turn, so the step-time
ratio is measured under the same machine load (as in ``llm_sft``).

Tasks (real data, offline; ``benchmarks/data.py``):
- ``sentiment``: a Rotten Tomatoes review snippet is fresh or rotten (2 classes), split by film;
- ``topics``: which of six sections of Python's documentation a passage is from (6 classes);
- ``plays``: which of Shakespeare's 36 First Folio plays a passage is from (36 classes);
- ``reward``: a one-output reward model on preference pairs, a fresh review of a film preferred
  over a rotten review of the same film; the loss is ``-log σ(r_chosen − r_rejected)`` (TRL's
  ``RewardTrainer`` loss), one batch holding the chosen rows then the rejected rows. Scored by
  pairwise accuracy (chosen scored above rejected) on films never seen in training.

Methods are ``llm_sft``'s: ``lora`` (backprop), ``finetune`` (``LDFAConfig.for_finetuning()``)
or a variant string such as ``"calibrated r8"``, ``"bp skip0.3"``, ``"bp cut10"``.
``--peft full`` trains every weight instead of LoRA r=8 on all linear layers.

    python -m benchmarks.llm_classify --task sentiment --methods finetune "bp cut10" --seeds 0 1 2
    python -m benchmarks.llm_classify --task reward --methods finetune --seeds 0 1 2 --curve 25
    python -m benchmarks.llm_classify --tiny     # a tiny random Llama, seconds (the tests)
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics

import torch
import torch.nn.functional as F

import ldfa_hf

from . import data
from .harness import ResultTable, out_path
from .llm_sft import (LR, RUN, config_for, cut_below, lockstep, pin_branches, plot_time_to_quality, time_to_quality,
                      tiny_llama, with_lora)

TASKS = ("sentiment", "topics", "plays", "reward")
FIELDS = ["task", "peft", "method", "seed", "steps", "batch_size", "tokens_per_step", "accuracy", "eval_loss",
          "bp_accuracy", "bp_eval_loss", "step_s", "bp_step_s", "speedup"]
CURVE_FIELDS = ["task", "peft", "method", "seed", "steps", "batch_size", "step", "seconds", "eval_loss", "accuracy"]
MAX_TOKENS = 96


# -- data ---------------------------------------------------------------------------------------
def task_data(task: str, seed: int) -> tuple[list, list, int]:
    """(training examples, held-out examples, number of outputs). An example is ``(text, label)``, or
    ``(chosen, rejected)`` for ``reward``; held-out films / plays' passages are never trained on."""
    if task == "reward":
        pairs = data.load_rotten_tomatoes_preferences(seed=0)
        rows = {k: [(r["chosen"], r["rejected"]) for r in v] for k, v in pairs.items()}
        outputs = 1
    else:
        loader = {"sentiment": data.load_rotten_tomatoes, "topics": data.load_pydoc_topics,
                  "plays": data.load_shakespeare_plays}[task]
        splits = loader(seed=0)
        rows = {k: [(r["text"], r["label"]) for r in v] for k, v in splits.items()}
        outputs = len({label for _, label in rows["train"]})
    train = rows["train"][:]
    random.Random(seed).shuffle(train)  # the seed picks the order of the batches; the split is fixed
    return train, rows["test"], outputs


def encode(tokenizer, examples, task: str) -> tuple[dict, torch.Tensor | None]:
    """A padded batch; for ``reward`` the chosen rows then the rejected rows (as RewardTrainer)."""
    if task == "reward":
        texts, labels = [c for c, _ in examples] + [r for _, r in examples], None
    else:
        texts, labels = [t for t, _ in examples], torch.tensor([y for _, y in examples])
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return dict(batch), labels


def loss_and_correct(model, batch: dict, labels, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss, and per example whether it is right (the label's class ranked first, or
    the chosen row scored above the rejected one)."""
    logits = model(**batch).logits
    if task == "reward":
        chosen, rejected = logits.squeeze(-1).chunk(2)
        return -F.logsigmoid(chosen - rejected).mean(), chosen > rejected
    return F.cross_entropy(logits, labels), logits.argmax(-1) == labels


@torch.no_grad()
def evaluate(model, tokenizer, examples, task: str, batch_size: int = 32) -> tuple[float, float]:
    """(accuracy, mean loss) on held-out examples."""
    model.eval()
    total = correct = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        loss, right = loss_and_correct(model, *encode(tokenizer, chunk, task), task)
        total += float(loss) * len(chunk)
        correct += float(right.sum())
    model.train()
    return correct / len(examples), total / len(examples)


# -- models -------------------------------------------------------------------------------------
def classifier(tiny: bool, outputs: int):
    """(model, tokenizer): a sequence classifier with ``outputs`` outputs and a pad token set (the
    last non-pad token is the one scored), from SmolLM2-135M-Instruct or a tiny random Llama."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    if tiny:
        lm, tokenizer = tiny_llama()
        config = copy.deepcopy(lm.config)
        config.num_labels = outputs
        torch.manual_seed(0)
        return LlamaForSequenceClassification(config), tokenizer
    from ldfa_hf.pretrained import smollm2_path

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)  # the head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=outputs, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def with_peft(model, peft: str, seed: int):
    """LoRA r=8 on every linear layer with the head trained in full, or every weight (``full``)."""
    return with_lora(model, peft, seed, task_type="SEQ_CLS")


# -- the lockstep run ---------------------------------------------------------------------------
def run(task: str, method: str, seed: int, steps: int, batch_size: int, lr: float | None, tiny: bool,
        peft: str = "lora", n_eval: int = 500, curve: list | None = None, eval_every: int = 0) -> dict:
    """One lockstep run of plain backprop and ``method``; ``curve`` (if given) receives both models'
    held-out loss and accuracy against their own step clocks."""
    from tqdm import tqdm

    lr = LR[peft] if lr is None else lr
    train, held, outputs = task_data(task, seed)
    held = held[:n_eval]
    base, tokenizer = classifier(tiny, outputs)
    twin = copy.deepcopy(base)
    bp_model, ldfa_model = with_peft(twin, peft, seed), with_peft(base, peft, seed)
    ldfa_model.load_state_dict({n: p for n, p in bp_model.named_parameters() if p.requires_grad}, strict=False)
    plugin = ldfa_hf.wrap(ldfa_model, config_for(method, base.config.num_hidden_layers))
    pin_branches(plugin, method)
    cut = cut_below(ldfa_model, method)
    models = {"bp": bp_model, "ldfa": ldfa_model}
    for model in models.values():
        model.train()  # from_pretrained returns eval mode, in which LDFA gathers no statistics
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
            for k, m in models.items()}
    times: dict[str, list] = {"bp": [], "ldfa": []}
    clock = {"bp": 0.0, "ldfa": 0.0}
    labels = {"bp": "backprop", "ldfa": method}
    tokens = []
    bar = tqdm(range(steps), desc=f"{task} {peft} {method} seed {seed}", disable=tiny)
    for step in bar:
        chunk = [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]
        batch, y = encode(tokenizer, chunk, task)
        tokens.append(int(batch["attention_mask"].sum()))
        lockstep(models, opts, {"ldfa": plugin}, step, lambda model: loss_and_correct(model, batch, y, task)[0], times, clock)
        bar.set_postfix(bp=f"{times['bp'][-1]:.2f}s", ldfa=f"{times['ldfa'][-1]:.2f}s")
        if curve is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            for key, model in models.items():  # evaluation is outside the clocks
                accuracy, loss_value = evaluate(model, tokenizer, held[:128], task)
                curve.append({"task": task, "peft": peft, "method": labels[key], "seed": seed, "steps": steps,
                              "batch_size": batch_size, "step": step + 1,
                              "seconds": f"{clock[key]:.2f}", "eval_loss": f"{loss_value:.4f}",
                              "accuracy": f"{accuracy:.4f}"})
    warm = slice(min(3, steps - 1), None)
    bp_step, ldfa_step = statistics.median(times["bp"][warm]), statistics.median(times["ldfa"][warm])
    (accuracy, loss_value), (bp_accuracy, bp_loss) = (evaluate(m, tokenizer, held, task) for m in (ldfa_model, bp_model))
    plugin.detach()
    if cut is not None:
        cut.remove()
    return {"task": task, "peft": peft, "method": method, "seed": seed, "steps": steps, "batch_size": batch_size,
            "tokens_per_step": round(statistics.mean(tokens)), "accuracy": f"{accuracy:.4f}",
            "eval_loss": f"{loss_value:.4f}", "bp_accuracy": f"{bp_accuracy:.4f}", "bp_eval_loss": f"{bp_loss:.4f}",
            "step_s": f"{ldfa_step:.3f}", "bp_step_s": f"{bp_step:.3f}", "speedup": f"{bp_step / ldfa_step:.3f}"}


def table(rows: list[dict]) -> str:
    """Markdown: per task, fine-tuning kind and method, the means over seeds of LDFA and of plain
    backprop from the same lockstep runs, the accuracy difference with its spread over seeds, and
    the median step speed-up."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["peft"], r["method"], r["steps"], r["batch_size"]), []).append(r)
    lines = ["| task | fine-tuning | method | steps × batch | seeds | accuracy (LDFA / backprop) | difference "
             "(mean ± sd, points) | eval loss (LDFA / backprop) | step speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, peft, method, steps, batch), cell in cells.items():
        acc = [100 * float(r["accuracy"]) for r in cell]
        bp = [100 * float(r["bp_accuracy"]) for r in cell]
        diff = [a - b for a, b in zip(acc, bp)]
        spread = f" ± {statistics.stdev(diff):.1f}" if len(diff) > 1 else ""
        loss = statistics.mean(float(r["eval_loss"]) for r in cell)
        bp_loss = statistics.mean(float(r["bp_eval_loss"]) for r in cell)
        lines.append(f"| {task} | {peft} | {method} | {steps} × {batch} | {len(cell)} | {statistics.mean(acc):.1f}% / "
                     f"{statistics.mean(bp):.1f}% | {statistics.mean(diff):+.1f}{spread} | {loss:.4f} / {bp_loss:.4f} | "
                     f"{statistics.median(float(r['speedup']) for r in cell):.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sentiment", choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=["finetune"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16, help="examples (reward: pairs) per step")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 for LoRA, 5e-5 for full")
    parser.add_argument("--peft", default="lora", choices=["lora", "full"])
    parser.add_argument("--eval", type=int, default=500, help="held-out examples scored at the end")
    parser.add_argument("--curve", type=int, default=0, metavar="N",
                        help="every N steps, both models' held-out loss and accuracy (128 examples) into "
                             "llm_classify_curve.csv, and the time-to-quality table and plot")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, a few steps (the tests)")
    parser.add_argument("--out", default=None, help="CSV to append to (default: benchmarks/results/llm_classify.csv; "
                                                    "a --tiny run writes to a temporary folder unless given)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.eval = min(args.steps, 4), min(args.batch_size, 4), min(args.eval, 8)
    args.out = out_path(args.out, "llm_classify.csv", args.tiny)
    results = ResultTable(args.out, FIELDS, key=["task", "peft", "method", "seed", "steps", "batch_size"])
    curve_path = os.path.join(os.path.dirname(args.out), "llm_classify_curve.csv")
    curves = ResultTable(curve_path, CURVE_FIELDS, key=RUN + ["step"])
    cells = [{"task": args.task, "peft": args.peft, "method": m, "seed": s, "steps": args.steps,
              "batch_size": args.batch_size} for m in args.methods for s in args.seeds]
    for cell in results.missing(cells):
        curve: list[dict] = []
        row = run(args.task, cell["method"], cell["seed"], args.steps, args.batch_size, args.lr, args.tiny,
                  args.peft, n_eval=args.eval, curve=curve, eval_every=args.curve)
        results.add(row)
        for point in curves.missing(curve):  # the backprop side of an earlier run of the same seed is kept
            curves.add(point)
        print("  " + ", ".join(f"{k}={row[k]}" for k in ("accuracy", "bp_accuracy", "eval_loss", "bp_eval_loss",
                                                          "speedup")), flush=True)
    print(table(results.rows))
    if curves.rows:
        print(time_to_quality(curves.rows, results.rows))
        print("plot:", plot_time_to_quality(curves.rows, curve_path.replace(".csv", ".png"), results.rows))
    print(f"results: {args.out}")
    return results.rows


if __name__ == "__main__":
    main()
