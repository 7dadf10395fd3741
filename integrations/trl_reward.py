"""Train a reward model with TRL's ``RewardTrainer`` + PEFT LoRA, and LDFA on the frozen base.

``RewardTrainer`` builds the PEFT model itself (``peft_config=``, ``task_type="SEQ_CLS"``, the
score head trained in full through ``modules_to_save``), turns gradient checkpointing on, and
puts the chosen rows then the rejected rows of each pair in one batch; the loss is
``-log σ(r_chosen − r_rejected)`` and it logs ``accuracy`` (chosen scored above rejected) and
``margin``. LDFA is attached to ``trainer.model`` once the trainer exists; the callback keeps
the feedback in step, writes it into every checkpoint and restores it on resume.

The default data are preference pairs made here: a question with its correct sum preferred
over a wrong one. Without ``--model`` it starts from SmolLM2-135M-Instruct (``ldfa_hf.pretrained``).

    python integrations/trl_reward.py --steps 50                # LoRA + LDFA
    python integrations/trl_reward.py --steps 50 --no-ldfa      # plain LoRA, to compare
    python integrations/trl_reward.py --steps 50 --resume       # continue from the last checkpoint
"""

from __future__ import annotations

import argparse
import random

import torch

import ldfa_hf
from ldfa_hf import LDFACallback, LDFAConfig


def sum_preferences(n: int, seed: int = 0):
    """Conversational preference pairs: the correct answer to "What is a + b?" over a wrong one."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-11, -10, -1, 1, 10, 11])
        prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": str(wrong)}]})
    return Dataset.from_list(rows)


def reward_model(path: str):
    """A one-output sequence classifier (the reward) and its tokenizer, with a pad token set."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def main(argv=None):
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or Hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="out/trl_reward")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--save-steps", type=int, default=25)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ldfa", action="store_true", help="plain LoRA with backprop")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    args = parser.parse_args(argv)

    path = args.model or str(ldfa_hf.pretrained.smollm2_path())
    model, tokenizer = reward_model(path)
    gpu = torch.cuda.is_available()
    config = RewardConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                          gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                          lr_scheduler_type="constant", logging_steps=min(10, args.steps), save_steps=args.save_steps,
                          report_to="none", seed=args.seed, bf16=gpu, use_cpu=not gpu)  # bf16 is TRL's default
    trainer = RewardTrainer(model=model, args=config, train_dataset=sum_preferences(args.examples, args.seed),
                            processing_class=tokenizer,
                            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                   task_type="SEQ_CLS"))
    if not args.no_ldfa:
        plugin = ldfa_hf.wrap(trainer.model, LDFAConfig.for_finetuning())  # the PEFT model TRL built
        plugin.summary()
        LDFACallback(plugin).install(trainer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return trainer


if __name__ == "__main__":
    main()
