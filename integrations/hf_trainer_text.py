"""Fine-tune a BERT-style text classifier with the Hugging Face Trainer and LDFA.

Data: four long topics of Python's own documentation (always installed), cut into
chunks; the task is to tell which topic a chunk comes from. The model is a pretrained
checkpoint given with ``--model`` (e.g. MiniLM), or a small BERT built from a config.

    python integrations/hf_trainer_text.py --model path/to/minilm --rule calibrated --rank 32   # fine-tune
    python integrations/hf_trainer_text.py --tiny --max-steps 8       # seconds
    python integrations/hf_trainer_text.py --tiny --resume            # continue the last checkpoint
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

import ldfa_hf

TOPICS = ("specialnames", "compound", "types", "formatstrings")


def topic_chunks(chunk_chars: int = 256) -> Dataset:
    from pydoc_data.topics import topics

    rows = []
    for label, name in enumerate(TOPICS):
        text = " ".join(topics[name].split())
        rows += [{"text": text[i:i + chunk_chars], "label": label}
                 for i in range(0, len(text) - chunk_chars, chunk_chars)]
    return Dataset.from_list(rows).shuffle(seed=0)


def byte_tokenize(batch, max_length: int):
    """Tokenizer-free fallback for the small model: bytes + 1 (0 is padding)."""
    ids = [[b + 1 for b in text.encode()[:max_length]] for text in batch["text"]]
    return {"input_ids": [x + [0] * (max_length - len(x)) for x in ids],
            "attention_mask": [[1] * len(x) + [0] * (max_length - len(x)) for x in ids]}


def build(model_path: str | None, tiny: bool, max_length: int):
    if model_path:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(TOPICS))
        return model, lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding="max_length")
    width = 32 if tiny else 128
    config = BertConfig(vocab_size=257, hidden_size=width, num_hidden_layers=2 if tiny else 4,
                        num_attention_heads=4, intermediate_size=2 * width, max_position_embeddings=max_length,
                        num_labels=len(TOPICS))
    return BertForSequenceClassification(config), lambda b: byte_tokenize(b, max_length)


class PauseAfterSave(TrainerCallback):
    """Test helper: give a watcher time to kill the process right after a checkpoint."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_save(self, args, state, control, **kwargs):
        print(f"saved checkpoint-{state.global_step}", flush=True)
        time.sleep(self.seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pretrained model folder or Hub id (default: small BERT)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--calibrate-every", type=int, default=ldfa_hf.LDFAConfig.calibrate_every,
                        help="calibrated rule: one exact step in this many")
    parser.add_argument("--rule", default="svd")
    parser.add_argument("--output-dir", default="out/hf_trainer_text")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--pause-after-save", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    set_seed(args.seed)
    max_length = 32 if args.tiny else 128
    model, tokenize = build(args.model, args.tiny, max_length)
    data = topic_chunks().map(tokenize, batched=True, remove_columns=["text"])
    if args.tiny:
        data = data.select(range(128))
    split = data.train_test_split(test_size=0.2, seed=0)

    plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=args.rank, rule=args.rule, seed=args.seed,
                                                          calibrate_every=args.calibrate_every))  # LDFA
    callbacks = [PauseAfterSave(args.pause_after_save)] if args.pause_after_save else []

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, save_steps=args.save_steps,
        logging_steps=max(1, args.save_steps // 2), eval_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=split["train"], callbacks=callbacks)
    ldfa_hf.LDFACallback(plugin).install(trainer)                              # LDFA, ahead of the reporters
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate(split["test"])
    predictions = trainer.predict(split["test"])
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    print(f"eval loss {metrics['eval_loss']:.4f}  accuracy {accuracy:.3f}  ldfa steps {plugin.num_steps}")
    plugin.save_pretrained(args.output_dir)                                                          # LDFA
    trainer.save_model(args.output_dir)
    return trainer, plugin


if __name__ == "__main__":
    main()
