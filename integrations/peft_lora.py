"""LoRA fine-tuning with PEFT, with LDFA on the frozen base layers.

LoRA trains small adapters, but its backward still sends the full error ``δ W`` through
every frozen layer; that is where LDFA saves. ``wrap`` on a PEFT model targets the frozen
base layers and leaves the adapters (lora_A / lora_B) exact.

A LoRA base is pretrained, so the feedback is the ``calibrated`` rule (README, "Fine-tuning"):
one step in four is exact backprop and re-aims every layer's rank-r feedback at the gradients
it sends down. Measured on pretrained MiniLM (benchmarks/results/RESULTS.md, 3 seeds): within
half a point of backprop on Shakespeare genres and 1.2 points on Python-doc sections, saving
56-58% of the backward multiply-adds; the paper's ``svd`` rule lost 7.6 and 20 points there.

    python integrations/peft_lora.py --model path/to/minilm
    python integrations/peft_lora.py --tiny --max-steps 8
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_trainer_text import build, topic_chunks  # noqa: E402  (the same data and model builder)

import ldfa_hf  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rank", type=int, default=32, help="LDFA feedback rank")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--rule", default="calibrated")
    parser.add_argument("--output-dir", default="out/peft_lora")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

    set_seed(args.seed)
    max_length = 32 if args.tiny else 128
    model, tokenize = build(args.model, args.tiny, max_length)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["query", "value"],
                      modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    data = topic_chunks().map(tokenize, batched=True, remove_columns=["text"])
    if args.tiny:
        data = data.select(range(128))
    split = data.train_test_split(test_size=0.2, seed=0)

    plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=args.rank, rule=args.rule, seed=args.seed))  # LDFA
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, save_strategy="no", logging_steps=max(1, args.max_steps // 5), report_to=[],
        seed=args.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=split["train"])
    ldfa_hf.LDFACallback(plugin).install(trainer)                              # LDFA, ahead of the reporters
    trainer.train()
    predictions = trainer.predict(split["test"])
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    print(f"accuracy {accuracy:.3f}  ldfa layers {len(plugin.targets)}  ldfa steps {plugin.num_steps}")
    model.save_pretrained(args.output_dir)   # the adapter, exactly as without LDFA
    return model, plugin


if __name__ == "__main__":
    main()
