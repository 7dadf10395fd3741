"""Supervised fine-tuning of a pretrained LLM (SmolLM2-135M-Instruct): plain LoRA vs LoRA + LDFA.

Both models start from the same pretrained weights and the same LoRA initialisation and see the
same batches; one optimizer step of each is taken in turn (lockstep), so the step-time ratio is
measured under the same machine load. Loss is on the completion tokens only.

Tasks (our own, made from a seed, so nothing is downloaded):
- ``arith``: "What is 417 + 385?" → "802", scored by exact match of the greedy answer;
- ``sort``: "Sort: 42 7 19 88" → "7 19 42 88", exact match;
- ``pydoc``: domain adaptation on Python's own documentation text, scored by eval loss.

Methods: ``lora`` (backprop), ``finetune`` (``LDFAConfig.for_finetuning()``, nothing tuned per
task), or a variant string: a rule name and words such as ``r32``, ``head`` (the LM head left
exact), ``od`` (o_proj and down_proj left exact), ``top2`` (the last 2 blocks left exact),
``exact0.67`` (``exact_top=0.67``: the top two thirds of the layers exact), ``every8``, ``rows32``.

    python -m benchmarks.llm_sft --task arith --methods finetune "calibrated r32" --seeds 0 1
    python -m benchmarks.llm_sft --tiny          # a tiny random Llama, seconds (the tests)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import statistics
import time

import torch

import ldfa_hf

from . import floor  # noqa: F401  (registers rule="floor", zero feedback, for the Pareto table)
from .harness import out_path

FIELDS = ["task", "peft", "method", "seed", "steps", "tokens_per_step", "exact_match", "eval_loss",
          "bp_exact_match", "bp_eval_loss", "step_s", "bp_step_s", "speedup"]


# -- tasks --------------------------------------------------------------------------------------
def task_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs, reproducible from ``seed``."""
    rng = random.Random(seed)
    out = []
    if task == "arith":
        for _ in range(n):
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            out.append((f"What is {a} + {b}? Answer with the number only.", str(a + b)))
    elif task == "sort":
        for _ in range(n):
            xs = rng.sample(range(1, 100), 5)
            out.append(("Sort these numbers in ascending order: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))))
    elif task == "pydoc":
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
        rng.shuffle(texts)
        words = " ".join(texts).split()
        chunk = 48
        for i in range(0, min(len(words), n * chunk), chunk):
            out.append(("", " ".join(words[i:i + chunk])))
    else:
        raise ValueError(f"unknown task {task!r}; choose arith, sort or pydoc")
    return out


class Encoder:
    """Chat-formatted prompts with loss on the answer only (prompt labels are -100)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self.end = tokenizer.eos_token or ""

    def prompt(self, text: str) -> list[int]:
        if not text:
            return [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        if self.chat:
            # a short system turn instead of the template's default one: fewer tokens a step
            rendered = self.tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
            return self.tok(rendered, add_special_tokens=False)["input_ids"]
        return self.tok(text + "\n", add_special_tokens=False)["input_ids"]

    def example(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        p = self.prompt(prompt)
        a = self.tok(answer + self.end, add_special_tokens=False)["input_ids"]
        return p + a, [-100] * len(p) + a

    def batch(self, pairs) -> dict:
        encoded = [self.example(p, a) for p, a in pairs]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad)
        labels = torch.full((len(encoded), width), -100)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (x, y) in enumerate(encoded):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def exact_match(model, enc: Encoder, pairs, max_new_tokens: int = 12, batch_size: int = 32) -> float:
    """Greedy answers (left-padded batches) compared with the reference after stripping."""
    model.eval()
    hits = 0
    pad = enc.tok.pad_token_id if enc.tok.pad_token_id is not None else 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [enc.prompt(p) for p, _ in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=enc.tok.eos_token_id)
        for j, (_, answer) in enumerate(chunk):
            text = enc.tok.decode(out[j, width:], skip_special_tokens=True).strip()
            hits += text == answer
    model.train()
    return hits / len(pairs)


@torch.no_grad()
def eval_loss(model, enc: Encoder, pairs, batch_size: int = 16) -> float:
    model.eval()
    total = count = 0.0
    for i in range(0, len(pairs), batch_size):
        batch = enc.batch(pairs[i:i + batch_size])
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train()
    return total / count


# -- models -------------------------------------------------------------------------------------
def base_model(tiny: bool):
    """(model, tokenizer): SmolLM2-135M-Instruct, or a tiny random Llama with a locally built tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tiny:
        return tiny_llama()
    from ldfa_hf.pretrained import smollm2_path

    folder = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tok


def tiny_llama():
    """A 2-block random Llama and a character-level tokenizer with a chat template, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("0123456789+?:., abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n()[]'\"=-_*/<>")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}, "<unk>": len(chars) + 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}={% else %}"
                         "{{ m['content'] }}</s>{% endif %}{% endfor %}")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tok


def with_lora(model, peft: str, seed: int, r: int = 8):
    from peft import LoraConfig, get_peft_model

    if peft == "full":
        return model
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def config_for(method: str, num_layers: int) -> ldfa_hf.LDFAConfig:
    """``finetune`` is ``LDFAConfig.for_finetuning()``; a variant string overrides it word by word."""
    if method == "finetune":
        return ldfa_hf.LDFAConfig.for_finetuning()
    words = method.split()
    settings, options, exclude = {"rule": words[0]}, {}, []
    for word in words[1:]:
        if word.startswith("r") and word[1:].isdigit():
            settings["rank"] = int(word[1:])
        elif word == "head":
            exclude.append(r".*lm_head")
        elif word == "od":  # the layers whose input gradient is the error of the block's own adapters
            exclude += [r".*o_proj.*", r".*down_proj.*"]
        elif word.startswith("exact") and word[5:].replace(".", "", 1).isdigit():  # exact0.67: exact_top
            settings["exact_top"] = float(word[5:])
        elif word.startswith("top") and word[3:].isdigit():
            exclude += [rf".*layers\.{i}\..*" for i in range(num_layers - int(word[3:]), num_layers)]
        elif word.startswith("every"):
            settings["calibrate_every"] = int(word[5:])
        elif word.startswith("rows"):
            options["rows"] = int(word[4:])
        elif word.startswith("decay"):
            options["decay"] = float(word[5:])
        else:
            raise ValueError(f"unknown word {word!r} in method {method!r}")
    if exclude:  # every entry is a regex over the whole module name
        settings["exclude_modules"] = "|".join(exclude)
    return ldfa_hf.LDFAConfig(rule_options=options, **settings)


# -- the lockstep run ---------------------------------------------------------------------------
def run(task: str, method: str, seed: int, steps: int, batch_size: int, lr: float, tiny: bool, peft: str = "lora",
        n_eval: int = 100, log=print, curve: list | None = None, eval_every: int = 0) -> dict:
    import copy

    base, tok = base_model(tiny)
    enc = Encoder(tok)
    examples = task_examples(task, steps * batch_size + n_eval, seed=1000 + seed)
    train, held = examples[n_eval:], examples[:n_eval]
    bp_model = with_lora(copy.deepcopy(base), peft, seed)
    ldfa_model = with_lora(base, peft, seed)
    ldfa_model.load_state_dict(bp_model.state_dict())
    num_layers = base.config.num_hidden_layers
    plugin = ldfa_hf.wrap(ldfa_model, config_for(method, num_layers))
    models = {"bp": bp_model, "ldfa": ldfa_model}
    for model in models.values():
        model.train()  # from_pretrained returns eval mode, in which LDFA gathers no statistics
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
            for k, m in models.items()}
    times = {"bp": [], "ldfa": []}
    clock = {"bp": 0.0, "ldfa": 0.0}
    tokens = []
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    for step in range(steps):
        batch = enc.batch([train[i] for i in order[step * batch_size:(step + 1) * batch_size]])
        tokens.append(int(batch["attention_mask"].sum()))
        for key in (("bp", "ldfa") if step % 2 == 0 else ("ldfa", "bp")):  # alternate who goes first
            model, opt = models[key], opts[key]
            start = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if key == "ldfa":
                plugin.step()
            elapsed = time.perf_counter() - start
            times[key].append(elapsed)
            clock[key] += elapsed
        if curve is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            for key, model in models.items():
                curve.append({"method": "lora" if key == "bp" else method, "step": step + 1, "seconds": clock[key],
                              "eval_loss": eval_loss(model, enc, held[:32])})
        if step % 10 == 0:
            log(f"  step {step}/{steps}: bp {times['bp'][-1]:.2f}s ldfa {times['ldfa'][-1]:.2f}s")
    warm = slice(min(3, steps - 1), None)
    bp_step, ldfa_step = statistics.median(times["bp"][warm]), statistics.median(times["ldfa"][warm])
    scored = task != "pydoc"
    result = {
        "task": task, "peft": peft, "method": method, "seed": seed, "steps": steps,
        "tokens_per_step": round(statistics.mean(tokens)),
        "exact_match": f"{exact_match(ldfa_model, enc, held):.4f}" if scored else "",
        "eval_loss": f"{eval_loss(ldfa_model, enc, held):.4f}",
        "bp_exact_match": f"{exact_match(bp_model, enc, held):.4f}" if scored else "",
        "bp_eval_loss": f"{eval_loss(bp_model, enc, held):.4f}",
        "step_s": f"{ldfa_step:.3f}", "bp_step_s": f"{bp_step:.3f}", "speedup": f"{bp_step / ldfa_step:.3f}",
    }
    plugin.detach()
    return result


def done_cells(path: str) -> set:
    if not os.path.isfile(path):
        return set()
    with open(path, newline="") as fh:
        return {(r["task"], r["peft"], r["method"], r["seed"], r["steps"]) for r in csv.DictReader(fh)}


def append(path: str, row: dict) -> None:
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arith", choices=["arith", "sort", "pydoc"])
    parser.add_argument("--methods", nargs="+", default=["finetune"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--peft", default="lora", choices=["lora", "full"])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, a few steps (the tests)")
    parser.add_argument("--out", default=None, help="CSV to append to (default: benchmarks/results/llm_sft.csv; "
                                                    "a --tiny run writes to a temporary folder unless given)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size = min(args.steps, 4), min(args.batch_size, 4)
    args.out = out_path(args.out, "llm_sft.csv", args.tiny)
    done = done_cells(args.out)
    for method in args.methods:
        for seed in args.seeds:
            key = (args.task, args.peft, method, str(seed), str(args.steps))
            if key in done:
                continue
            print(f"{args.task} {args.peft} {method!r} seed {seed}:", flush=True)
            row = run(args.task, method, seed, args.steps, args.batch_size, args.lr, args.tiny, args.peft,
                      n_eval=8 if args.tiny else 100, log=lambda s: print(s, flush=True))
            append(args.out, row)
            print("  " + ", ".join(f"{k}={row[k]}" for k in ("exact_match", "bp_exact_match", "eval_loss",
                                                              "bp_eval_loss", "speedup")), flush=True)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
