"""Fine-tune pretrained MiniLM-L6 to tell comedy, history and tragedy apart (experiment e).

    python -m benchmarks.minilm_genres          # full and LoRA: bp vs LDFA svd r=8 (3 seeds); oja r=8, svd r=64
    python -m benchmarks.minilm_genres --tiny   # seconds

256-character passages of Shakespeare's plays, labelled by the play's First-Folio genre; the
test plays are never seen in training (the split is by play). Training goes through the
Hugging Face ``Trainer``, with ``LDFACallback`` for LDFA — the way a user would run it.
LoRA (PEFT, r = 8 on query/key/value/dense) keeps the base frozen; LDFA then replaces the
error sent down through every frozen layer. Results: benchmarks/results/minilm_genres.csv
and minilm_genres_loss.png (training-loss curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import tempfile
import time

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

import ldfa_hf
from ldfa_hf.metrics import Accuracy

from .data import load_pydoc_topics, load_shakespeare_genres, minilm_path
from .harness import ResultTable, attach, out_path, plot_curves, select

FIELDS = ["mode", "method", "rank", "variant", "seed", "train_examples", "test_accuracy", "backward_saved", "step_ms",
          "loss_curve", "seconds"]
KEY = ["mode", "method", "rank", "variant", "seed", "train_examples"]
LR = {"full": 1e-4, "lora": 1e-3}
LOG_EVERY = 5  # optimizer steps between logged training losses
TASKS = {"genres": "Shakespeare genres", "pydoc": "Python-doc sections"}
# A variant is a space-separated list of changes from the library defaults ("" = the defaults):
#   everyK      calibrate_every=K
#   errors      calibrated rule aims P at the output-error subspace, Q = PᵀW (rule_options={"subspace": "output"})
#   warmup      also calibrate on steps 1, 2, 4, ... below calibrate_every (rule_options={"warmup": True})
#   memoryB     fit each calibration to a running sum of sketches, decay B (rule_options={"memory": B}, e.g. memory0.5)
#   exactF      exact_top=F: the top F of the layers keep exact backprop (with the rule and rank of
#               LDFAConfig.for_finetuning(), its exact_top is that configuration)
#   skipS       skip_branches=S; with bottom (branch_allocation="bottom") and tail (branch_tail=True), as
#               LDFAConfig.for_finetuning() has them
#   exact-head  pooler and classifier keep exact backprop (no residual path around them)
#   mlp-only    LDFA on the MLP blocks only, attention exact
TARGETS = {"exact-head": {"exclude_modules": r".*(pooler|classifier).*"},
           "mlp-only": {"target_modules": r".*layer\.\d+\.(intermediate|output)\.dense(\.base_layer)?"}}
SWITCHES = {"errors": {"subspace": "output"}, "warmup": {"warmup": True}}


def variant_settings(variant: str) -> tuple[dict, dict]:
    """(LDFAConfig keyword arguments, rule attributes) of a variant string."""
    config, switches = {}, {}
    for word in variant.split():
        if word.startswith("every"):
            config["calibrate_every"] = int(word[5:])
        elif word.startswith("memory"):
            switches["memory"] = float(word[6:])
        elif word.startswith("exact") and word[5:].replace(".", "", 1).isdigit():
            config["exact_top"] = float(word[5:])
        elif word.startswith("skip") and word[4:].replace(".", "", 1).isdigit():
            config["skip_branches"] = float(word[4:])
        elif word == "bottom":
            config["branch_allocation"] = "bottom"
        elif word == "tail":
            config["branch_tail"] = True
        elif word in TARGETS:
            config.update(TARGETS[word])
        elif word in SWITCHES:
            switches.update(SWITCHES[word])
        else:
            raise ValueError(f"unknown variant word {word!r} in {variant!r}")
    return config, switches


def attach_variant(model, method: str, rank: int, seed: int, variant: str, refresh_every):
    """``method`` "finetune" is ``LDFAConfig.for_finetuning()``; any other is a rule, changed by ``variant``."""
    if method == "finetune":
        return ldfa_hf.wrap(model, ldfa_hf.LDFAConfig.for_finetuning(seed=seed))
    config, options = variant_settings(variant)
    if options:
        config["rule_options"] = options
    return attach(model, method, rank, seed, refresh_every=refresh_every, **config)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer and the LDFA step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def model_for(mode: str, tiny: bool, num_labels: int = 3):
    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    if tiny:  # one layer of the real model: same code path, a fraction of the time
        model.bert.encoder.layer = model.bert.encoder.layer[:1]
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                                                 task_type="SEQ_CLS"))
    return model


def fine_tune(mode: str, method: str, rank: int, variant: str, seed: int, data, epochs: float, batch_size: int,
              tiny: bool) -> dict:
    set_seed(seed)
    model = model_for(mode, tiny, num_labels(data))
    steps = int(epochs * len(data["train"]) // batch_size)
    plugin = attach_variant(model, method, rank, seed, variant, refresh_every=max(1, steps // 4))
    timer = StepTimer()
    callbacks = [timer] + ([ldfa_hf.LDFACallback(plugin)] if plugin is not None else [])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=64, learning_rate=LR[mode], warmup_steps=max(1, steps // 10), weight_decay=0.01,
            logging_steps=LOG_EVERY if steps >= 4 * LOG_EVERY else 1, save_strategy="no", report_to=[], seed=seed, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=data["train"], callbacks=callbacks)
        trainer.train()
        predictions = trainer.predict(data["test"])
    accuracy = Accuracy().compute(predictions=predictions.predictions.argmax(-1), references=predictions.label_ids)
    curve = [f"{h['step']}:{h['loss']:.4f}" for h in trainer.state.log_history if "loss" in h]
    saved = backward_saving(mode, method, rank, variant, data, batch_size, trainer.state.global_step, tiny)
    return {"test_accuracy": f"{accuracy['accuracy']:.4f}", "backward_saved": f"{saved:.4f}", "step_ms": f"{1000 * statistics.median(timer.times[2:] or timer.times):.1f}",
            "loss_curve": " ".join(curve)}


def backward_saving(mode: str, method: str, rank: int, variant: str, data, batch_size: int, steps: int,
                    tiny: bool) -> float:
    """Backward multiply-adds LDFA saves over a run of ``steps`` optimizer steps, as a fraction of backprop's
    over *every* linear layer (so variants that leave some layers exact compare on one scale), with the
    exact calibration steps the run really took (warm-up ones included). Estimated on one batch."""
    if method == "bp":
        return 0.0
    model = model_for(mode, tiny, num_labels(data))
    plugin = attach_variant(model, method, rank, 0, variant, refresh_every=None)
    batch = {k: torch.tensor(v) for k, v in data["train"][:batch_size].items() if k in ("input_ids", "attention_mask", "label")}
    batch["labels"] = batch.pop("label")
    model(**batch).loss.backward()
    if method == "finetune":  # skipped branches: the whole model's estimate counts them (and the exact layers)
        from ldfa_hf.diagnostics import whole_model_cost

        saved = whole_model_cost(plugin)["backward_saved"]
        plugin.detach()
        return saved
    cost = plugin.cost()
    ldfa = cost["backward_ldfa"]
    if plugin.config.rule == "calibrated":  # exact steps as counted in this run, the rest plain LDFA steps
        config, every = plugin.config, plugin.config.calibrate_every
        exact_steps = sum(plugin.rule.due(step) for step in range(steps))
        plugin.config = dataclasses.replace(config, calibrate_every=1)
        calibration = plugin.cost()["backward_ldfa"]
        plugin.config = dataclasses.replace(config, calibrate_every=10**12)
        plain = plugin.cost()["backward_ldfa"]
        plugin.config = config
        ldfa = (exact_steps * calibration + (steps - exact_steps) * plain) / steps
    plugin.detach()
    reference = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule="bp"))
    model.zero_grad()
    model(**batch).loss.backward()
    everything = reference.cost()["backward_bp"]
    return (cost["backward_bp"] - ldfa) / everything


def num_labels(data) -> int:
    return len(set(data["train"]["label"]) | set(data["test"]["label"]))


def tokenized(task: str, train_examples: int, test_examples: int, chunk_chars: int, max_length: int):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_shakespeare_genres(chunk_chars=chunk_chars) if task == "genres" else load_pydoc_topics()
    data["train"] = data["train"].select(range(min(train_examples, len(data["train"]))))
    data["test"] = data["test"].select(range(min(test_examples, len(data["test"]))))
    return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding="max_length"),
                    batched=True, remove_columns=[c for c in ("text", "play") if c in data["train"].column_names])


def cells(modes: list[str], rank: int, seeds: int, variant_seeds: int = 1) -> list[tuple[str, str, int, str, int]]:
    """(mode, method, rank, variant, seeds): bp, svd and calibrated (r = 32, defaults) over ``seeds`` in every
    mode; the calibrated research variants once (the Pareto table of RESULTS.md)."""
    out = []
    for mode in modes:
        out += [(mode, "bp", 0, "", seeds), (mode, "svd", rank, "", seeds), (mode, "calibrated", 32, "", seeds)]
        out += [(mode, "calibrated", 32, v, variant_seeds) for v in ("every8", "every16", "warmup", "exact-head",
                                                                     "memory0.5", "every8 memory0.5")]
        out += [(mode, "calibrated", r, "", 1) for r in (8, 64)]
        out += [(mode, "calibrated", 32, "errors " + v, 1) for v in ("every4", "every8", "every16", "every32")]
        out += [(mode, "calibrated", 32, "errors every8 " + v, 1) for v in ("warmup", "exact-head")]
        out += [(mode, "calibrated", r, "errors every8", 1) for r in (8, 64)]
        out.append((mode, "finetune", 0, "", variant_seeds))  # LDFAConfig.for_finetuning()
        out.append((mode, "sampled", 32, "exact0.67", variant_seeds))  # v0.2.0's for_finetuning()
        out.append((mode, "calibrated", 32, "exact0.67", variant_seeds))  # v0.1.0's
    if "full" in modes:
        out += [("full", "oja", rank, "", 1), ("full", "svd", 8 * rank, "", 1),
                ("full", "calibrated", 32, "mlp-only", 1), ("full", "calibrated", 32, "errors every8 mlp-only", 1)]
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for bp and LDFA svd")
    parser.add_argument("--variant-seeds", type=int, default=1, help="seeds for the calibrated research variants")
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=600)
    parser.add_argument("--chunk-chars", type=int, default=256, help="passage length (about 60 tokens)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--task", default="genres", choices=["genres", "pydoc"],
                        help="genres: Shakespeare comedy/history/tragedy, split by play; pydoc: six sections of "
                             "Python's documentation (a second task for checking that defaults generalise)")
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/minilm_<task>.csv)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these methods (e.g. calibrated)")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these variants ('' for the defaults)")
    parser.add_argument("--shard", default=None, help="i/n: run every n-th missing cell starting at i")
    parser.add_argument("--recompute-saving", action="store_true",
                        help="recompute the backward_saved column of every row (it depends on the cell, not the seed); "
                             "runs no new cell")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    args.out = out_path(args.out, f"minilm_{args.task}.csv", args.tiny)
    max_length = 64
    if args.tiny:
        args.seeds, args.train_examples, args.test_examples, max_length = 1, 32, 16, 32
    data = tokenized(args.task, args.train_examples, args.test_examples, args.chunk_chars, max_length)
    table = ResultTable(args.out, FIELDS, key=KEY)
    plan = cells(args.modes, args.rank, args.seeds, args.variant_seeds)
    everything = list(plan)  # --only / --variants choose what runs; tables and plots show every cell
    if args.only:
        plan = [c for c in plan if c[1] in args.only]
    if args.variants is not None:
        plan = [c for c in plan if c[3] in args.variants]
    todo = [{"mode": mode, "method": method, "rank": rank, "variant": variant, "seed": s,
             "train_examples": len(data["train"])}
            for mode, method, rank, variant, seeds in plan for s in range(seeds)]
    todo.sort(key=lambda c: c["seed"])
    if args.recompute_saving:
        steps = math.ceil(args.epochs * len(data["train"]) / args.batch_size)
        saved = {}
        for row in table.select(train_examples=len(data["train"])):
            cell = (row["mode"], row["method"], int(row["rank"]), row["variant"])
            if cell not in saved:
                saved[cell] = backward_saving(*cell, data, args.batch_size, steps, args.tiny)
            row["backward_saved"] = f"{saved[cell]:.4f}"
        table.rewrite()
        todo = []  # recompute only; run nothing new
    if args.shard is not None:  # i/n: every n-th cell, for running two processes side by side
        i, n = map(int, args.shard.split("/"))
        todo = table.missing(todo)[i::n]
    table.run(todo, lambda c: fine_tune(c["mode"], c["method"], c["rank"], c["variant"], c["seed"], data, args.epochs,
                                        args.batch_size, args.tiny), desc="minilm genres")
    rows = table.select(train_examples=len(data["train"]))
    summary = summarise(rows, everything)
    print(markdown_table(summary))
    curves = {}
    for line in summary:
        if line["variant"] == "" and line["method"] in ("bp", "svd", "calibrated") and line["rank"] in (0, args.rank, 32):
            cell = select(rows, mode=line["mode"], method=line["method"], rank=line["rank"], variant="")
            label = f"{line['mode']} " + ("backprop" if line["method"] == "bp" else f"LDFA {line['method']} r={line['rank']}")
            curves[f"{label} ({line['accuracy']:.1f}%)"] = [(int(p.split(":")[0]), float(p.split(":")[1]))
                                                          for p in cell[0]["loss_curve"].split()]
    plot_curves(curves, args.out[:-4] + "_loss.png", f"MiniLM on {TASKS[args.task]}: training loss (seed 0)",
                xlabel="optimizer step", window=3)
    plot_pareto(summary, args.out[:-4] + "_pareto.png", f"MiniLM on {TASKS[args.task]}: accuracy vs backward saved")
    return rows


def describe(method: str, rank: int, variant: str) -> str:
    if method == "bp":
        return "backprop"
    if method == "finetune":
        return "for_finetuning()"
    return f"{method} r={rank}" + (f" {variant}" if variant else "")


def summarise(rows: list[dict], plan) -> list[dict]:
    """One line per planned cell that has results: mean (sd) accuracy in %, saving in %, seeds."""
    out = []
    for mode, method, rank, variant, _ in plan:
        cell = select(rows, mode=mode, method=method, rank=rank, variant=variant)
        if not cell:
            continue
        accs = [100 * float(r["test_accuracy"]) for r in cell]
        saved = [100 * float(r["backward_saved"]) for r in cell if r["backward_saved"]]
        out.append({"mode": mode, "method": method, "rank": rank, "variant": variant,
                    "accuracy": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else None,
                    "saved": statistics.mean(saved) if saved else None, "seeds": len(accs),
                    "step_ms": statistics.median(float(r["step_ms"]) for r in cell)})
    return out


def markdown_table(summary: list[dict]) -> str:
    bp = {line["mode"]: line["accuracy"] for line in summary if line["method"] == "bp"}
    lines = ["| mode | feedback | accuracy | vs bp | backward saved | seeds |", "|---|---|---|---|---|---|"]
    for line in summary:
        sd = f" ± {line['sd']:.1f}" if line["sd"] is not None else ""
        delta = "" if line["method"] == "bp" or line["mode"] not in bp else f"{line['accuracy'] - bp[line['mode']]:+.1f}"
        saved = "" if line["saved"] is None else f"{line['saved']:.0f}%"
        lines.append(f"| {line['mode']} | {describe(line['method'], line['rank'], line['variant'])} | "
                     f"{line['accuracy']:.1f}%{sd} | {delta} | {saved} | {line['seeds']} |")
    return "\n".join(lines)


def plot_pareto(summary: list[dict], path: str, title: str) -> str:
    """Accuracy against backward multiply-adds saved: the front a user chooses from, per mode.
    Marker = how the feedback is fitted; each point is labelled with its changes from the defaults."""
    from .harness import _pyplot, save_figure

    plt = _pyplot()
    styles = {"regression": ("o", "tab:blue"), "errors": ("^", "tab:orange"), "svd": ("s", "tab:gray"),
              "oja": ("v", "tab:purple")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, mode in zip(axes, ("full", "lora")):
        seen = set()
        for line in (line for line in summary if line["mode"] == mode):
            if line["method"] == "bp":
                ax.axhline(line["accuracy"], color="k", ls="--", lw=1, label="backprop")
                continue
            if line["saved"] is None:
                continue
            family = line["method"] if line["method"] != "calibrated" else (
                "errors" if "errors" in line["variant"].split() else "regression")
            marker, color = styles.get(family, ("x", "tab:red"))
            label = {"regression": "calibrated (regression fit)", "errors": "calibrated (error-subspace fit)"}.get(
                family, f"LDFA {family}")
            ax.plot([line["saved"]], [line["accuracy"]], marker, color=color, ms=9 if line["seeds"] > 1 else 5,
                    label=None if label in seen else label)
            seen.add(label)
            words = [w for w in line["variant"].split() if w != "errors"]
            text = " ".join(([f"r={line['rank']}"] if line["rank"] != 32 else []) + words) or "default"
            ax.annotate(text, (line["saved"], line["accuracy"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("backward multiply-adds saved over all linear layers (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{title} ({mode}; large marker = 3 seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
