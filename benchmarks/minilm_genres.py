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
import os
import statistics
import tempfile
import time

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

import ldfa_hf
from ldfa_hf.metrics import Accuracy

from .data import load_shakespeare_genres, minilm_path
from .harness import RESULTS, ResultTable, attach, plot_curves, select

FIELDS = ["mode", "method", "rank", "seed", "train_examples", "test_accuracy", "step_ms", "loss_curve", "seconds"]
LR = {"full": 1e-4, "lora": 1e-3}
LOG_EVERY = 5  # optimizer steps between logged training losses


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer and the LDFA step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def model_for(mode: str, tiny: bool):
    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    if tiny:  # one layer of the real model: same code path, a fraction of the time
        model.bert.encoder.layer = model.bert.encoder.layer[:1]
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                                                 task_type="SEQ_CLS"))
    return model


def fine_tune(mode: str, method: str, rank: int, seed: int, data, epochs: float, batch_size: int, tiny: bool) -> dict:
    set_seed(seed)
    model = model_for(mode, tiny)
    steps = int(epochs * len(data["train"]) // batch_size)
    plugin = attach(model, method, rank, seed, refresh_every=max(1, steps // 4))
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
    return {"test_accuracy": f"{accuracy['accuracy']:.4f}", "step_ms": f"{1000 * statistics.median(timer.times[2:] or timer.times):.1f}",
            "loss_curve": " ".join(curve)}


def tokenized(train_examples: int, test_examples: int, chunk_chars: int, max_length: int):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_shakespeare_genres(chunk_chars=chunk_chars)
    data["train"] = data["train"].select(range(min(train_examples, len(data["train"]))))
    data["test"] = data["test"].select(range(min(test_examples, len(data["test"]))))
    return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding="max_length"),
                    batched=True, remove_columns=["text", "play"])


def cells(modes: list[str], rank: int, seeds: int) -> list[tuple[str, str, int, int]]:
    """(mode, method, rank, seeds): bp and LDFA svd in every mode over ``seeds``; oja and a 8× rank once."""
    out = []
    for mode in modes:
        out += [(mode, "bp", 0, seeds), (mode, "svd", rank, seeds)]
    if "full" in modes:
        out += [("full", "oja", rank, 1), ("full", "svd", 8 * rank, 1)]
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for bp and LDFA svd")
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=600)
    parser.add_argument("--chunk-chars", type=int, default=256, help="passage length (about 60 tokens)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(RESULTS, "minilm_genres.csv"))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    max_length = 64
    if args.tiny:
        args.seeds, args.train_examples, args.test_examples, max_length = 1, 32, 16, 32
    data = tokenized(args.train_examples, args.test_examples, args.chunk_chars, max_length)
    table = ResultTable(args.out, FIELDS, key=["mode", "method", "rank", "seed", "train_examples"])
    plan = cells(args.modes, args.rank, args.seeds)
    todo = [{"mode": mode, "method": method, "rank": rank, "seed": s, "train_examples": len(data["train"])}
            for mode, method, rank, seeds in plan for s in range(seeds)]
    todo.sort(key=lambda c: c["seed"])
    table.run(todo, lambda c: fine_tune(c["mode"], c["method"], c["rank"], c["seed"], data, args.epochs,
                                        args.batch_size, args.tiny), desc="minilm genres")
    rows = table.select(train_examples=len(data["train"]))
    print(f"{'mode':<6} {'method':<6} {'rank':>5} {'test acc (mean)':>16} {'step ms':>9} {'seeds':>6}")
    curves = {}
    for mode, method, rank, _ in plan:
        cell = select(rows, mode=mode, method=method, rank=rank)
        if cell:
            acc = statistics.mean(float(r["test_accuracy"]) for r in cell)
            ms = statistics.median(float(r["step_ms"]) for r in cell)
            print(f"{mode:<6} {method:<6} {rank or '—':>5} {100 * acc:>15.2f}% {ms:>9.1f} {len(cell):>6}")
            label = f"{mode} {'backprop' if method == 'bp' else f'LDFA {method} r={rank}'}"
            curves[f"{label} ({100 * acc:.1f}%)"] = [(int(p.split(":")[0]), float(p.split(":")[1]))
                                                     for p in cell[0]["loss_curve"].split()]
    plot_curves(curves, args.out[:-4] + "_loss.png", "MiniLM on Shakespeare genres: training loss (seed 0)",
                xlabel="optimizer step", window=3)
    return rows


if __name__ == "__main__":
    main()
