"""Supervised fine-tuning of a pretrained LLM (SmolLM2-135M-Instruct): plain LoRA vs LoRA + LDFA.

Both models start from the same pretrained weights and the same LoRA initialisation and see the
same batches; one optimizer step of each is taken in turn (lockstep), so the step-time ratio is
measured under the same machine load. Loss is on the completion tokens only.

Tasks (our own, made from a seed, so nothing is downloaded):
- ``arith``: "What is 417 + 385?" → "802", scored by exact match of the greedy answer;
- ``sort``: "Sort: 42 7 19 88" → "7 19 42 88", exact match;
- ``pydoc``: domain adaptation on Python's own documentation text, scored by eval loss;
- ``docs``: instruction following in chat format on real text, "In one sentence, what does
  `heapq.merge` do in Python?" → the first sentence of its docstring (~2,200 standard-library
  names; 100 held out), scored by held-out loss on the answers.

Methods: ``lora`` (backprop), ``finetune`` (``LDFAConfig.for_finetuning()``, nothing tuned per
task), or a variant string: a rule name and words such as ``r32``, ``head`` (the LM head left
exact), ``head256`` (the head's feedback at rank 256), ``od`` (o_proj and down_proj left exact),
``top2`` (the last 2 blocks left exact), ``exact0.67`` (``exact_top=0.67``: the top two thirds of
the layers exact), ``dense`` (the exact head multiplies every row of its error, also the zero
ones: ``skip_zero_rows=False``), ``cut10`` (no gradient at all below block 10: LoRA on the top
blocks only, the baseline), ``lora20`` (LoRA adapters on the top 20 blocks only, PEFT's
``layers_to_transform``: the same gradients as ``cut10`` from a model that holds no adapters
below), ``every8``, ``rows32``, ``frac0.25`` (``sampled``: the share of rows made
exact); for residual-branch skipping ``skip0.5`` (``skip_branches``), ``tail``, ``bridge32``,
``unbiased``, an allocation (``sensitivity``, ``uniform``, ``depth``, ``bottom``), ``dropbp`` (the
DropBP baseline's rates, ``dropbp_rates``), ``mlp`` / ``attention`` (only the bottom share of that
kind of branch skips, ``pin_branches``) or ``exactevery8`` (every 8th step runs every branch exact).

The methods a seed still lacks train side by side in one lockstep run against one plain LoRA
(each takes a step in turn, the order rotating), so every method's step-time ratio is measured
under the same load.

``--peft`` picks LoRA r=8 on all linear layers (default), QLoRA (the same adapters on an nf4
bitsandbytes base loaded with ``BitsAndBytesConfig``) or full fine-tuning (every weight trains).
``--curve N`` records both models' held-out loss every N steps against their own step clocks
(``llm_sft_curve.csv``) and draws the time-to-quality plot ``llm_sft_curve.png``.

    python -m benchmarks.llm_sft --task arith --methods finetune "calibrated r32" --seeds 0 1
    python -m benchmarks.llm_sft --task pydoc --steps 80 --batch-size 8 --curve 10
    python -m benchmarks.llm_sft --tiny --peft qlora   # a tiny random Llama, seconds (the tests)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import ldfa_hf
from ldfa_hf import allocation

from . import floor  # noqa: F401  (registers rule="floor", zero feedback, for the Pareto table)
from .harness import ResultTable, out_path, row_key

FIELDS = ["task", "peft", "method", "seed", "steps", "batch_size", "tokens_per_step", "exact_match", "eval_loss",
          "bp_exact_match", "bp_eval_loss", "step_s", "bp_step_s", "speedup", "speedup_mean"]
BRANCH_FIELDS = ["task", "peft", "method", "seed", "branch", "role", "depth", "gain", "rate", "exact_backwards"]
CURVE_FIELDS = ["task", "peft", "method", "seed", "steps", "batch_size", "step", "seconds", "eval_loss", "train_loss"]
RUN = ["task", "peft", "method", "seed", "steps", "batch_size"]  # what names one run (of a method, or its plain LoRA)


def run_key(row: dict) -> tuple:
    return row_key(row, RUN)


# -- tasks --------------------------------------------------------------------------------------
TASKS = ("arith", "sort", "pydoc", "docs")
DOCS_HELD = 100  # the docs task's held-out questions (a run holds out at most its first 100 examples)


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
    elif task == "docs":  # instruction following on real text: a standard-library name → its docstring's summary
        from .data import python_api_docs

        docs = list(python_api_docs())
        rng.shuffle(docs)
        pairs = [(f"In one sentence, what does `{name}` do in Python?", sentence) for name, sentence in docs]
        held, rest = pairs[:DOCS_HELD], pairs[DOCS_HELD:]  # the first ones are never repeated: held out
        out = held + [rest[i % len(rest)] for i in range(max(0, n - DOCS_HELD))]
        out = out[:n]
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
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
def base_model(tiny: bool, peft: str = "lora"):
    """(model, tokenizer): SmolLM2-135M-Instruct, or a tiny random Llama with a locally built tokenizer.

    ``peft="qlora"`` loads the base through transformers' ``BitsAndBytesConfig`` (nf4, float32
    compute), as a QLoRA user would; the tiny model is saved to a temporary folder first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    if peft == "qlora":
        from transformers import BitsAndBytesConfig

        extra = {"device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)}
    if tiny:
        model, tok = tiny_llama(width=64 if peft == "qlora" else 32)  # 4-bit blocks are 64 wide
        if peft != "qlora":
            return model, tok
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ldfa_tiny_llama_") as folder:
            model.save_pretrained(folder)
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra), tok
    from ldfa_hf.pretrained import smollm2_path

    folder = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra), tok


def tiny_llama(width: int = 32):
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
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tok


def with_lora(model, peft: str, seed: int, r: int = 8, task_type: str = "CAUSAL_LM", top: int | None = None):
    """LoRA r on every linear layer (``SEQ_CLS``: the head trained in full too, PEFT putting it in
    ``modules_to_save``), or every weight trainable (``full``). ``top``: adapters in the top ``top``
    blocks only (PEFT's ``layers_to_transform``)."""
    from peft import LoraConfig, get_peft_model

    if peft == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    torch.manual_seed(seed)
    targets, layers = "all-linear", None
    if top is not None:  # PEFT takes layers_to_transform with a list of module names only
        n = model.config.num_hidden_layers
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layers." in name})
        layers = list(range(n - top, n))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                                            task_type=task_type, layers_to_transform=layers))


def numbered(method: str, prefix: str) -> int | None:
    """The number of a method's word ``<prefix><N>`` (``cut10`` → 10), or None if it has none."""
    found = [int(w[len(prefix):]) for w in method.split() if w.startswith(prefix) and w[len(prefix):].isdigit()]
    return found[0] if found else None


def config_for(method: str, num_layers: int) -> ldfa_hf.LDFAConfig:
    """``finetune`` is ``LDFAConfig.for_finetuning()``; a variant string overrides it word by word."""
    if method == "finetune":
        return ldfa_hf.LDFAConfig.for_finetuning()
    words = method.split()  # "finetune exactevery8": the default with benchmark words added
    settings = dict(ldfa_hf.config.FINETUNING) if words[0] == "finetune" else {"rule": words[0]}
    options, exclude = {}, []
    for word in words[1:]:
        if word.startswith("r") and word[1:].isdigit():
            settings["rank"] = int(word[1:])
        elif word == "head":
            exclude.append(r".*lm_head")
        elif word.startswith("head") and word[4:].isdigit():  # head256: the LM head's feedback at rank 256
            settings.setdefault("rank_pattern", {})["lm_head"] = int(word[4:])
        elif word == "od":  # the layers whose input gradient is the error of the block's own adapters
            exclude += [r".*o_proj.*", r".*down_proj.*"]
        elif word.startswith("exactevery") and word[10:].isdigit():  # every K-th step all exact (pin_branches)
            pass
        elif word.startswith("exact") and word[5:].replace(".", "", 1).isdigit():  # exact0.67: exact_top
            settings["exact_top"] = float(word[5:])
        elif word.startswith("top") and word[3:].isdigit():
            exclude += [rf".*layers\.{i}\..*" for i in range(num_layers - int(word[3:]), num_layers)]
        elif word.startswith("cut") and word[3:].isdigit():  # handled by cut_below(); the rule's layers never see δ
            pass
        elif word.startswith("lora") and word[4:].isdigit():  # handled by with_lora(top=...): adapters on top blocks
            pass
        elif word == "dense":  # the exact head multiplies every row of its error, zero or not
            settings["skip_zero_rows"] = False
        elif word.startswith("every"):
            settings["calibrate_every"] = int(word[5:])
        elif word.startswith("rows"):
            options["rows"] = int(word[4:])
        elif word.startswith("frac"):  # sampled: the share of rows computed exactly
            options["fraction"] = float(word[4:])
        elif word.startswith("skip") and word[4:].replace(".", "", 1).isdigit():  # skip0.5: skip_branches
            settings["skip_branches"] = float(word[4:])
        elif word.startswith("bridge") and word[6:].isdigit():  # bridge32: skipped branches bridged at rank 32
            settings["branch_bridge"] = int(word[6:])
        elif word == "tail":  # a skipped branch's output projection still learns
            settings["branch_tail"] = True
        elif word == "unbiased":  # an exact branch sends 1/(1-p) of its input error
            settings["branch_unbiased"] = True
        elif word == "dropbp":  # the DropBP baseline: rates from its gradient-change sensitivity (dropbp_rates)
            settings["branch_allocation"] = "uniform"  # no taps; the rates are replaced once measured
        elif word in ("uniform", "depth", "sensitivity", "bottom", "cut"):  # how the branch rates are allocated
            settings["branch_allocation"] = word
        elif word.startswith("width"):  # with cut: the share of the widest range the cut spans (pin_branches)
            pass
        elif word in ("mlp", "attention"):  # only this role's branches skip (pin_branches)
            settings["branch_allocation"] = "uniform"  # no taps; the rates are replaced by pin_branches
        elif word.startswith("decay"):
            options["decay"] = float(word[5:])
        else:
            raise ValueError(f"unknown word {word!r} in method {method!r}")
    if exclude:  # every entry is a regex over the whole module name
        settings["exclude_modules"] = "|".join(exclude)
    return ldfa_hf.LDFAConfig(rule_options=options, **settings)


def dropbp_rates(model, plugin, batch: dict, mean: float) -> torch.Tensor:
    """The DropBP baseline's sensitivity (Woo et al., NeurIPS 2024, as we read the paper; our code):
    on one batch, for each branch, the norm of the change in the trainable parameters' gradient
    when that branch alone skips its backward. The rates then take the same capped ``c / S`` form
    as ``branch_allocation="sensitivity"``, so the two differ only in what they measure. One
    forward and backward per branch, before training (not in the step times)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    hooks = list(plugin._branches.values())
    for hook in hooks:
        hook.mode = "exact"
    full = gradient()
    sensitivity = []
    for hook in hooks:
        hook.mode = "skip"
        sensitivity.append(float((gradient() - full).norm()))
        hook.mode = "exact"
    model.zero_grad(set_to_none=True)
    return allocation.sensitivity_rates(torch.tensor(sensitivity, dtype=torch.float64), mean)


def pin_rates(plugin, rates: torch.Tensor) -> None:
    """A baseline's own fixed branch rates in place of the plugin's allocation, drawn from the next step."""
    plugin.branch_rates = lambda: rates
    plugin._schedule()


def pin_branches(plugin, method: str) -> None:
    """The benchmark-only allocations a method names. ``mlp`` or ``attention``: the bottom
    ``skip_branches`` share of that role's branches skip on every step, the other role's never (a
    fixed cut of one kind of sublayer). ``width0.5`` with ``cut``: the random cut spans that share of
    the widest range (``allocation.cut_bounds``). ``exactevery8``: every 8th step (the first
    included) runs every branch exact, so the adapters below the skipped branches learn on those."""
    hooks = list(plugin._branches.values())
    for word in method.split():
        if word.startswith("width"):
            bounds = allocation.cut_bounds(len(hooks), plugin.config.skip_branches, float(word[5:]))
            plugin.cut_bounds = lambda: bounds
            plugin._schedule()
    every, draw = numbered(method, "exactevery"), plugin._draw_branches
    if every:
        def draw_with_exact_steps():
            draw()
            if plugin.num_steps % every == 0:
                for hook in hooks:
                    hook.mode = "exact"

        plugin._draw_branches = draw_with_exact_steps
        plugin._schedule()
    for role in {"mlp", "attention"} & set(method.split()):
        count = round(plugin.config.skip_branches * sum(h.role == role for h in hooks))
        chosen = [h.name for h in hooks if h.role == role][:count]
        pin_rates(plugin, torch.tensor([1.0 if h.name in chosen else 0.0 for h in hooks], dtype=torch.float64))


def blocks_of(model):
    """The decoder blocks of a Llama-style model, under PEFT's wrapper or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def cut_below(model, method: str):
    """``cut10`` in a method: blocks 0–9 get no gradient at all (their input is detached at block 10),
    so their adapters do not train and their backward never runs. The baseline LDFA has to beat:
    LoRA on the top blocks only, with none of their backward below."""
    cut = numbered(method, "cut")
    if cut is None:
        return None
    blocks = blocks_of(model)

    def detach(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    return blocks[cut].register_forward_pre_hook(detach, with_kwargs=True)


# -- the lockstep run ---------------------------------------------------------------------------
LR = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}  # the usual orders of magnitude for adapters vs all weights


def lockstep(models: dict, opts: dict, plugins: dict, step: int, loss_of, times: dict, clock: dict) -> dict:
    """One optimizer step of each model on the same batch (then ``plugins[key].step()`` for an LDFA
    model), the order rotating with ``step`` so that no model always goes first: each step's time
    lands in ``times`` and ``clock``; returns each model's training loss."""
    losses = {}
    keys = list(models)
    for key in keys[step % len(keys):] + keys[:step % len(keys)]:
        model, opt, plugin = models[key], opts[key], plugins.get(key)
        start = time.perf_counter()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if plugin is not None:
            plugin.step()
        elapsed = time.perf_counter() - start
        times[key].append(elapsed)
        clock[key] += elapsed
        losses[key] = loss.item()
    return losses


def run(task: str, methods, seed: int, steps: int, batch_size: int, lr: float | None, tiny: bool,
        peft: str = "lora", n_eval: int = 100, curve: list | None = None, eval_every: int = 0) -> list[dict]:
    """One lockstep run of plain LoRA and every method in ``methods`` (a string: one method) from the
    same weights and adapters on the same batches; a result row per method, its step-time ratio
    against the plain LoRA of the same run. ``curve`` (if given) receives each model's held-out loss
    against its own step clock."""
    import copy

    from tqdm import tqdm

    methods = [methods] if isinstance(methods, str) else list(methods)
    lr = LR[peft] if lr is None else lr
    base, tok = base_model(tiny, peft)
    enc = Encoder(tok)
    examples = task_examples(task, steps * batch_size + n_eval, seed=1000 + seed)
    train, held = examples[n_eval:], examples[:n_eval]
    models = {"backprop": with_lora(base_model(tiny, peft)[0] if peft == "qlora" else copy.deepcopy(base), peft, seed)}
    trainable = {n: p for n, p in models["backprop"].named_parameters() if p.requires_grad}
    plugins, cuts = {}, []
    for i, method in enumerate(methods):  # 4-bit weights cannot be deep-copied: load them again
        twin = base if i == len(methods) - 1 else (base_model(tiny, peft)[0] if peft == "qlora" else copy.deepcopy(base))
        model = models[method] = with_lora(twin, peft, seed, top=numbered(method, "lora"))  # lora20: top 20 only
        model.load_state_dict(trainable, strict=False)  # the same adapters (4-bit state is not copied)
        plugins[method] = ldfa_hf.wrap(model, config_for(method, base.config.num_hidden_layers))
        if "dropbp" in method.split():
            model.train()
            rates = dropbp_rates(model, plugins[method], enc.batch(train[:batch_size]), plugins[method].config.skip_branches)
            pin_rates(plugins[method], rates)
        pin_branches(plugins[method], method)
        cuts.append(cut_below(model, method))
    for model in models.values():
        model.train()  # from_pretrained returns eval mode, in which LDFA gathers no statistics
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
            for k, m in models.items()}
    times: dict[str, list] = {k: [] for k in models}
    clock = {k: 0.0 for k in models}
    losses: dict[str, list] = {k: [] for k in models}
    tokens = []
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    bar = tqdm(range(steps), desc=f"{task} {peft} {' | '.join(methods)} seed {seed}", disable=tiny)
    for step in bar:
        batch = enc.batch([train[i] for i in order[step * batch_size:(step + 1) * batch_size]])
        tokens.append(int(batch["attention_mask"].sum()))
        for key, loss in lockstep(models, opts, plugins, step, lambda model: model(**batch).loss, times, clock).items():
            losses[key].append(loss)
        bar.set_postfix({("lora" if k == "backprop" else f"m{i}"): f"{times[k][-1]:.2f}s" for i, k in enumerate(models)})
        if curve is not None and eval_every and (step == 0 or (step + 1) % eval_every == 0 or step + 1 == steps):
            for key, model in models.items():  # evaluation is outside the clocks
                recent = losses[key][-eval_every:]
                curve.append({"task": task, "peft": peft, "method": key, "seed": seed, "steps": steps,
                              "batch_size": batch_size, "step": step + 1, "seconds": f"{clock[key]:.2f}",
                              "eval_loss": f"{eval_loss(model, enc, held[:32]):.4f}",
                              "train_loss": f"{statistics.mean(recent):.4f}"})
    warm = slice(min(3, steps - 1), None)
    step_s = {k: statistics.median(v[warm]) for k, v in times.items()}
    mean_s = {k: statistics.mean(v[warm]) for k, v in times.items()}  # for a method whose steps differ by design
    scored = task in ("arith", "sort")  # pydoc and docs are scored by held-out loss
    score = {k: (f"{exact_match(m, enc, held):.4f}" if scored else "", f"{eval_loss(m, enc, held):.4f}")
             for k, m in models.items()}
    rows = []
    for method in methods:
        plugin = plugins[method]
        rows.append({
            "task": task, "peft": peft, "method": method, "seed": seed, "steps": steps, "batch_size": batch_size,
            "tokens_per_step": round(statistics.mean(tokens)),
            "exact_match": score[method][0], "eval_loss": score[method][1],
            "bp_exact_match": score["backprop"][0], "bp_eval_loss": score["backprop"][1],
            "step_s": f"{step_s[method]:.3f}", "bp_step_s": f"{step_s['backprop']:.3f}",
            "speedup": f"{step_s['backprop'] / step_s[method]:.3f}",
            "speedup_mean": f"{mean_s['backprop'] / mean_s[method]:.3f}",
            "branches": [{"task": task, "peft": peft, "method": method, "seed": seed, "branch": name, "role": b.role,
                          "depth": b.depth, "gain": f"{b.gain:.4f}", "rate": f"{b.rate:.3f}",
                          "exact_backwards": b.exact_backwards} for name, b in plugin.branches.items()]})
        plugin.detach()
    for cut in cuts:
        if cut is not None:
            cut.remove()
    return rows


def pareto_table(rows: list[dict]) -> str:
    """Markdown: per task, fine-tuning kind, configuration and batch size, means over seeds of LDFA and of
    plain backprop from the same lockstep runs, the differences, and the step speed-up."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["peft"], r["method"], r.get("batch_size", "")), []).append(r)

    def mean(cell, column):
        values = [float(r[column]) for r in cell if r[column] != ""]
        return statistics.mean(values) if values else None

    lines = ["| task | fine-tuning | configuration | batch | seeds | exact match (LDFA / backprop, diff) | "
             "eval loss (LDFA / backprop, diff) | step speed-up |", "|---|---|---|---|---|---|---|---|"]
    for (task, peft, method, batch), cell in groups.items():
        em, bp_em = mean(cell, "exact_match"), mean(cell, "bp_exact_match")
        loss, bp_loss = mean(cell, "eval_loss"), mean(cell, "bp_eval_loss")
        em_text = f"{100 * em:.1f}% / {100 * bp_em:.1f}% ({100 * (em - bp_em):+.1f})" if em is not None else ""
        loss_text = f"{loss:.4f} / {bp_loss:.4f} ({100 * (loss / bp_loss - 1):+.1f}%)"
        lines.append(f"| {task} | {peft} | {method} | {batch} | {len(cell)} | {em_text} | {loss_text} | "
                     f"{statistics.median(float(r['speedup']) for r in cell):.2f}× |")
    return "\n".join(lines)


def reached_at(points: list[tuple], target: float):
    """The first step at which a curve of (step, loss) points reaches ``target``, interpolated
    linearly between the two points around the crossing; None if it never does."""
    previous = None
    for step, loss in sorted(points):
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        previous = (step, loss)
    return None


def time_to_quality(curve: list[dict], results: list[dict]) -> str:
    """Markdown: per lockstep run, the step at which the method's held-out loss first reached plain
    LoRA's final one (interpolated between curve points), and the time-to-quality speed-up that
    makes with the run's own step-time ratio: ``(plain LoRA's steps × its step time) / (the
    method's steps × its step time)``, plain LoRA's steps being those *it* took to first reach
    that loss (a noisy curve can touch it before its last step; an exact method then scores 1×).
    Steps do not depend on the machine's load and the ratio was measured side by side, so runs
    made at different times compare. A run is named by task,
    fine-tuning kind, method, seed, steps and batch size (a curve written before the last two were
    recorded matches on the first four)."""
    points: dict[tuple, list] = {}
    for r in curve:
        points.setdefault(run_key(r), []).append((int(r["step"]), float(r["eval_loss"])))

    def curve_of(row: dict, method: str) -> list:
        key = run_key({**row, "method": method})
        return sorted(points.get(key) or points.get(key[:4] + ("", ""), []))

    lines = ["| task | fine-tuning | method | seed | plain LoRA's final held-out loss (step) | method reaches it at step | "
             "step speed-up | time-to-quality speed-up |", "|---|---|---|---|---|---|---|---|"]
    for row in results:
        bp, mine = curve_of(row, "backprop"), curve_of(row, row["method"])
        if not bp or not mine:
            continue
        last, target = bp[-1]
        first = reached_at(bp, target)  # a noisy curve can touch its final loss before its last step
        reached = reached_at(mine, target)
        speed = float(row["speedup"])
        ttq = f"{first / reached * speed:.2f}×" if reached else f"not reached (final {mine[-1][1]:.4f})"
        lines.append(f"| {row['task']} | {row['peft']} | {row['method']} | {row['seed']} | {target:.4f} ({last}; "
                     f"first at {first:.0f}) | {f'{reached:.0f}' if reached else '-'} | {speed:.2f}× | {ttq} |")
    return "\n".join(lines)


def plot_time_to_quality(rows: list[dict], path: str, results: list[dict] | None = None,
                         column: str = "eval_loss") -> str:
    """Held-out loss (``column="train_loss"``: the training loss over the last curve interval's
    batches, the same batches for every method, so a smoother comparison) against training time,
    one panel per task and fine-tuning kind, one line per method: the mean over its seeds at each
    evaluated step. With ``results`` the time is steps ×
    the method's median step time over those runs (plain LoRA: its median over the same runs), so
    that runs made under different machine loads share one clock; without, each model's own
    recorded seconds (averaged over seeds)."""
    from .harness import _pyplot, save_figure

    step_s: dict[tuple, float] = {}
    if results:
        drawn = {run_key(r) for r in rows}
        times: dict[tuple, list] = {}
        for r in results:
            if run_key(r) not in drawn:
                continue  # plain LoRA's step time from the runs whose curves are drawn
            times.setdefault((r["task"], r["peft"], r["method"]), []).append(float(r["step_s"]))
            times.setdefault((r["task"], r["peft"], "backprop"), []).append(float(r["bp_step_s"]))
        step_s = {key: statistics.median(values) for key, values in times.items()}
    plt = _pyplot()
    panels = sorted({(r["task"], r["peft"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (task, peft) in zip(axes[0], panels):
        lines: dict[str, dict] = {}
        for r in rows:
            if (r["task"], r["peft"]) == (task, peft) and not (column == "train_loss" and int(r["step"]) == 1):
                per_step = step_s.get((task, peft, r["method"]))  # (the training loss of step 1 is one batch's)
                x = int(r["step"]) * per_step if per_step else float(r["seconds"])
                point = lines.setdefault(r["method"], {}).setdefault(int(r["step"]), [])
                point.append((x, float(r[column]), str(r["seed"])))
        for method, by_step in sorted(lines.items(), key=lambda kv: (kv[0] != "backprop", kv[0])):
            seeds = {seed for values in by_step.values() for _, _, seed in values}
            xs = [statistics.mean(x for x, _, _ in by_step[k]) for k in sorted(by_step)]
            ys = [statistics.mean(y for _, y, _ in by_step[k]) for k in sorted(by_step)]
            ax.plot(xs, ys, "--" if method == "backprop" else "-", marker=".", lw=1.4,
                    label=f"{'plain LoRA' if method == 'backprop' else method} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
        ax.set_xlabel("training seconds: steps × the median step time (2-core CPU)" if step_s
                      else "training seconds (2-core CPU, steps only)")
        ax.set_yscale("log")  # the methods part near the end, where the losses are small
        ax.set_ylabel(("held-out loss" if column == "eval_loss" else "training loss, the same batches")
                      + " (mean over seeds, log scale)")
        ax.set_title(f"SmolLM2-135M {peft}: {task}")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def drawn_rows(curve: list[dict], steps: int, batch_size: int, methods: list[str] | None = None) -> list[dict]:
    """The curve points a plot draws: runs of these steps and batch size, of ``methods`` (all if None)
    and plain LoRA, in the (task, fine-tuning kind) panels where one of those methods ran."""
    rows = [r for r in curve if (r["steps"], r["batch_size"]) == (str(steps), str(batch_size))
            and (methods is None or r["method"] in ["backprop", *methods])]
    panels = {(r["task"], r["peft"]) for r in rows if r["method"] != "backprop"}
    return [r for r in rows if (r["task"], r["peft"]) in panels]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arith", choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=["finetune"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 for (Q)LoRA, 5e-5 for full")
    parser.add_argument("--peft", default="lora", choices=["lora", "qlora", "full"])
    parser.add_argument("--curve", type=int, default=0, metavar="N",
                        help="every N steps, held-out loss of both models into llm_sft_curve.csv and the "
                             "time-to-quality plot")
    parser.add_argument("--plot-methods", nargs="+", default=None, metavar="METHOD",
                        help="draw only these methods (and plain LoRA) in the time-to-quality plots")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, a few steps (the tests)")
    parser.add_argument("--out", default=None, help="CSV to append to (default: benchmarks/results/llm_sft.csv; "
                                                    "a --tiny run writes to a temporary folder unless given)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size = min(args.steps, 4), min(args.batch_size, 4)
    args.out = out_path(args.out, "llm_sft.csv", args.tiny)
    table = ResultTable(args.out, FIELDS, key=["task", "peft", "method", "seed", "steps", "batch_size"])
    curve_path = os.path.join(os.path.dirname(args.out), "llm_sft_curve.csv")
    curves = ResultTable(curve_path, CURVE_FIELDS, key=RUN + ["step"])
    cells = [{"task": args.task, "peft": args.peft, "method": m, "seed": s, "steps": args.steps,
              "batch_size": args.batch_size} for m in args.methods for s in args.seeds]
    branch_table = ResultTable(os.path.join(os.path.dirname(args.out), "llm_sft_branches.csv"), BRANCH_FIELDS,
                               key=["task", "peft", "method", "seed", "branch"])
    for seed in args.seeds:  # the methods a seed still lacks run side by side against one plain LoRA
        todo = [c["method"] for c in table.missing(cells) if c["seed"] == seed]
        if not todo:
            continue
        curve: list[dict] = []
        rows = run(args.task, todo, seed, args.steps, args.batch_size, args.lr, args.tiny, args.peft,
                   n_eval=8 if args.tiny else 100, curve=curve, eval_every=args.curve)
        for row in rows:
            for branch in row.pop("branches"):  # each branch's measured gain and final rate (skip_branches)
                branch_table.add(branch)
            table.add(row)
            print(f"  {row['method']}: " + ", ".join(f"{k}={row[k]}" for k in (
                "exact_match", "bp_exact_match", "eval_loss", "bp_eval_loss", "speedup", "speedup_mean")), flush=True)
        for point in curves.missing(curve):  # the bp side of an earlier run of the same seed is kept
            curves.add(point)
    print(pareto_table(table.rows))
    if curves.rows:
        print(time_to_quality(curves.rows, table.rows))
        drawn = drawn_rows(curves.rows, args.steps, args.batch_size, args.plot_methods) or curves.rows
        print("plots:", plot_time_to_quality(drawn, curve_path.replace(".csv", ".png"), table.rows),
              plot_time_to_quality(drawn, curve_path.replace(".csv", "_train.png"), table.rows, column="train_loss"))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
