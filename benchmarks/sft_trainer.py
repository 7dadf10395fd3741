"""Step time and held-out loss through TRL's ``SFTTrainer``: plain LoRA against ``for_finetuning()``.

This is what a user runs (``integrations/trl_sft.py``): the trainer builds the PEFT model from
``peft_config=``, the loss is on the completions only, and TRL scores them with its own LM head
(TRL 1.x fuses the head and the loss: the model's ``lm_head`` module never runs, so LDFA's
zero-row-skipping head has nothing to do). ``benchmarks.llm_sft`` measures the same methods in
lockstep on our own loop; this measures them inside the trainer, data collation and logging
included.

Runs alternate (plain, LDFA; then LDFA, plain; ...), so a drift in the machine's speed falls on
both methods. A run's step time is the median of its steps after the first two; a round's
speed-up is its plain step time over its LDFA one. Every run of a method takes the same steps on
the same batches, so its held-out loss (on examples the training never sees) is the same in
every round.

    python -m benchmarks.sft_trainer --task docs --steps 40 --rounds 3
    python -m benchmarks.sft_trainer --tiny      # a tiny random Llama, seconds (the tests)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from transformers import TrainerCallback

from integrations import trl_sft

from .harness import ResultTable, out_path

FIELDS = ["task", "method", "round", "steps", "batch_size", "tokens_per_step", "step_s", "eval_loss", "trl"]
KEY = ["task", "method", "round", "steps", "batch_size"]
METHODS = ("lora", "finetune")  # plain LoRA; LoRA + LDFAConfig.for_finetuning()
WARM = 2  # steps left out of a run's median


class StepClock(TrainerCallback):
    """Each optimizer step's wall-clock time (collation, forward, backward, optimizer, callbacks)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def datasets(task: str, n_train: int, n_eval: int, seed: int):
    """(train, held out): the first ``n_eval`` examples of the task are never trained on."""
    data = trl_sft.chat_dataset(task, n_train + n_eval, seed)
    return data.select(range(n_eval, len(data))), data.select(range(n_eval))


def one_run(method: str, args, folder: str) -> dict:
    """One ``SFTTrainer`` run of ``method`` (``lora`` or ``finetune``): its tokens a step, median step
    time and held-out loss."""
    train, held = datasets(args.task, args.steps * args.batch_size, args.eval_examples, args.seed)
    clock = StepClock()
    run_args = trl_sft.parser().parse_args(
        ["--output-dir", folder, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
         "--save-steps", str(args.steps + 1), "--task", args.task, "--seed", str(args.seed)]
        + (["--model", args.model] if args.model else []) + (["--no-ldfa"] if method == "lora" else []))
    trainer = trl_sft.build(run_args, train_dataset=train, eval_dataset=held, callbacks=[clock],
                            include_num_input_tokens_seen="non_padding", save_strategy="no")
    trainer.train()
    seconds = clock.seconds[WARM:] or clock.seconds
    return {"tokens_per_step": round(trainer.state.num_input_tokens_seen / max(1, trainer.state.global_step)),
            "step_s": f"{statistics.median(seconds):.3f}", "eval_loss": f"{trainer.evaluate()['eval_loss']:.4f}"}


def summary(rows: list[dict]) -> str:
    """Per (task, steps, batch): the median over rounds of each round's plain / LDFA step time, and the
    held-out losses."""
    lines = ["| task | steps × batch | tokens a step | plain LoRA step | speed-up (median over rounds) | rounds "
             "| held-out loss plain | `for_finetuning()` |", "|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["task"], r["steps"], r["batch_size"]) for r in rows})
    for task, steps, batch in cells:
        mine = [r for r in rows if (r["task"], r["steps"], r["batch_size"]) == (task, steps, batch)]
        by = {(r["method"], r["round"]): r for r in mine}
        rounds = sorted({r["round"] for r in mine if ("lora", r["round"]) in by and ("finetune", r["round"]) in by})
        if not rounds:
            continue
        ratios = [float(by["lora", k]["step_s"]) / float(by["finetune", k]["step_s"]) for k in rounds]
        plain = statistics.median(float(by["lora", k]["step_s"]) for k in rounds)
        loss = {m: next((by[m, k]["eval_loss"] for k in rounds if by[m, k]["eval_loss"]), "") for m in METHODS}
        lines.append(f"| {task} | {steps} × {batch} | {by['lora', rounds[0]]['tokens_per_step']} | {plain:.2f} s "
                     f"| **{statistics.median(ratios):.2f}×** ({', '.join(f'{x:.2f}' for x in ratios)}) | {len(rounds)} "
                     f"| {loss['lora']} | {loss['finetune']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import trl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="docs", choices=["arith", "docs"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="a model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="with --model, a few steps (the tests)")
    parser.add_argument("--out", default=None, help="CSV to append to (default: benchmarks/results/sft_trainer.csv)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.rounds, args.eval_examples = min(args.steps, 4), 2, min(args.rounds, 2), 4
    args.out = out_path(args.out, "sft_trainer.csv", args.tiny)
    table = ResultTable(args.out, FIELDS, key=KEY)
    for k in range(args.rounds):
        order = METHODS if k % 2 == 0 else METHODS[::-1]
        cells = [{"task": args.task, "method": m, "round": k, "steps": args.steps, "batch_size": args.batch_size}
                 for m in order]
        for cell in table.missing(cells):
            with tempfile.TemporaryDirectory() as folder:
                row = {**cell, **one_run(cell["method"], args, folder), "trl": trl.__version__}
            table.add(row)
            print(f"  round {k} {row['method']}: step {row['step_s']} s, held-out loss {row['eval_loss']}", flush=True)
    print(summary(table.rows))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
