"""Training-step time and peak memory: backprop vs LDFA, measured side by side in one run.

Cases:
  mlp         4 × Linear(2048) + GELU, batch 1024, r = 32 (pretraining: every weight trains)
  llama       Llama-style decoder: hidden 768, intermediate 2048, 4 layers, 12 heads,
              seq 256, vocab 8000, batch 4, r = 32
  mlp-lora    the mlp with its weights frozen and PEFT LoRA (r = 8) adapters on every layer
  llama-lora  the llama, frozen, LoRA (r = 8) on every attention and MLP projection
  smollm2-*   pretrained SmolLM2-135M-Instruct, LoRA r = 8 on all linear layers: -lora on 8×128
              tokens of Python-doc text (every token scored), -sft the same with only the last half of
              each sequence scored, -256 at 2×128 tokens, -arith a batch of llm_sft's arithmetic task

Methods, timed side by side: a never-wrapped model (backprop); the **floor**, the same
hooks with a zero input gradient for every targeted layer (all of the weight-gradient
work, none of the feedback or rule work: the fastest any feedback through these hooks can
be); the rules svd (the default: AdamW descent every step), svd-refit (``refit_every=4``),
local, oja and calibrated at rank r; and ``rule="bp"`` (exact backprop through the hooks:
their overhead). One timed sample is the mean step (forward, backward, fused AdamW,
``plugin.step()``) over 4 consecutive steps, so that svd-refit's sweep and the calibrated
rule's exact step (``calibrate_every=4``) are paid for in every sample.
Samples are interleaved across methods so drift hits all alike; ratios are medians of
per-round ratios. For each rule, "of floor" is the share of the floor's saving it keeps,
(t_bp − t_rule) / (t_bp − t_floor). Peak memory is what a step allocates on top of weights,
gradients and optimizer state (CUDA: max allocated; CPU: the live tensors the step creates,
counted by ``TensorMemory``).

    python -m benchmarks.speed                  # mlp, llama and llama-lora, 5 repetitions
    python -m benchmarks.speed --compile        # torch.compile (inductor): backprop vs svd, and LDFA's graph breaks
    python -m benchmarks.speed --bf16           # under bf16 autocast
    python -m benchmarks.speed --phases         # where the time goes: forward, backward, optimizer, plugin
    python -m benchmarks.speed --sweep          # mlp and mlp-lora over widths 512–4096 × ranks 8–128, with plot
    python -m benchmarks.speed --gpu-suite      # all of the above into one folder of CSVs (for a lent GPU)
    python -m benchmarks.speed --tiny           # seconds, for the tests
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
import warnings
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ldfa_hf
from benchmarks.floor import Floor  # noqa: F401  (registers rule="floor")

RULES = ("svd", "svd-refit", "local", "oja", "calibrated")
METHODS = ("backprop", "floor", *RULES, "bp-rule")
CYCLE = 4  # steps per timed sample: one svd-refit sweep and one calibration step (calibrate_every=4) in each


def attach(model: nn.Module, method: str, rank: int):
    """The plugin for ``method`` (``None`` for plain backprop). Speed only: svd on a LoRA base is
    timed although it is the wrong rule for fine-tuning, so its warning is silenced here."""
    if method == "backprop":
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LDFA rule='svd' on a model whose targeted weights", ldfa_hf.LDFAWarning)
        return _wrap(model, method, rank)


def _wrap(model: nn.Module, method: str, rank: int):
    if method == "finetune":  # the documented fine-tuning configuration
        return ldfa_hf.wrap(model, ldfa_hf.LDFAConfig.for_finetuning(rank=rank))
    if " " in method:  # a variant string of benchmarks.llm_sft, e.g. "calibrated r32 top20"
        from benchmarks.llm_sft import config_for, cut_below

        plugin = ldfa_hf.wrap(model, config_for(method, model.config.num_hidden_layers))
        cut_below(model, method)  # "cut10": no gradient below block 10 (stays for the model's life)
        return plugin
    if method == "svd-refit":
        return ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=rank, rule="svd", refit_every=CYCLE))
    return ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=rank, rule="bp" if method == "bp-rule" else method))  # floor too


CASES = ("mlp", "llama", "mlp-lora", "llama-lora", "smollm2-lora", "smollm2-lora-256", "smollm2-sft", "smollm2-sft-256",
         "smollm2-arith")
# (sequences, tokens) per step; the -sft cases score the last half of each sequence only, as
# completion-only SFT does (the rest is the prompt), the others every token
SMOLLM2_TOKENS = {"smollm2-lora": (8, 128), "smollm2-lora-256": (2, 128), "smollm2-sft": (8, 128),
                  "smollm2-sft-256": (2, 128), "smollm2-arith": (8, 0)}  # arith: llm_sft's task, ~317 tokens
LORA_R = 8


def build(case: str, tiny: bool, width: int | None = None):
    """(model, make_batch, loss_fn) for a case; ``tiny`` shrinks it to run in seconds, ``width`` sets the mlp's."""
    base, lora = case.removesuffix("-lora"), case.endswith("-lora")
    if base == "mlp":
        width = width or (64 if tiny else 2048)
        batch = 32 if tiny else 1024
        layers = []
        for _ in range(4):
            layers += [nn.Linear(width, width), nn.GELU()]
        model = nn.Sequential(*layers[:-1])
        x = torch.randn(batch, width)
        target = torch.randn(batch, width)
        model = with_lora(model, ["0", "2", "4", "6"]) if lora else model
        return model, lambda: {"input": x}, lambda model, b: nn.functional.mse_loss(model(b["input"]), target)
    if base == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, inter, layers, heads, seq, vocab, batch = (
            (32, 64, 2, 4, 16, 128, 2) if tiny else (768, 2048, 4, 12, 256, 8000, 4)
        )
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq)
        model = LlamaForCausalLM(config)
        if lora:
            model = with_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        return model, lambda: {"input_ids": ids, "labels": ids}, lambda model, b: model(**b).loss
    if base in SMOLLM2_TOKENS or case in SMOLLM2_TOKENS:
        return smollm2_lora(case, tiny)
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def smollm2_lora(case: str, tiny: bool):
    """Pretrained SmolLM2-135M-Instruct with PEFT LoRA r=8 on all linear layers, on Python-doc text
    (``tiny``: the 2-block random Llama of the LLM benchmark); ``-sft`` cases score half the tokens,
    ``smollm2-arith`` is a batch of the LLM benchmark's arithmetic task (answers: a tenth of the tokens)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .llm_sft import tiny_llama

    sequences, length = SMOLLM2_TOKENS[case]
    if tiny:
        model, tokenizer = tiny_llama()
        sequences, length = 2, 16
    else:
        folder = ldfa_hf.pretrained.smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if case == "smollm2-arith":  # one batch of benchmarks.llm_sft's arithmetic task: loss on the answers only
        from .llm_sft import Encoder, task_examples

        batch = Encoder(tokenizer).batch(task_examples("arith", sequences if not tiny else 2, seed=0))
    else:
        from pydoc_data.topics import topics

        text = " ".join(topics[k] for k in sorted(topics))[:200_000]
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:sequences * length])
        batch = {"input_ids": ids.view(sequences, length), "labels": ids.view(sequences, length).clone()}
        if "-sft" in case:
            batch["labels"][:, :length // 2] = -100  # the prompt half: no loss
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where calibrated/streaming would skip their statistics
    return model, lambda: batch, lambda model, b: model(**b).loss


def with_lora(model: nn.Module, target_modules: list[str]) -> nn.Module:
    """Freeze ``model`` and add PEFT LoRA adapters (B initialised non-zero, as after some training)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=target_modules,
                                             lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.01)
    return model


class Runner:
    """One model + optimizer (+ plugin) that can take timed training steps."""

    def __init__(self, case: str, method: str, rank: int, tiny: bool, device: str, width: int | None = None,
                 compiled: bool = False, bf16: bool = False) -> None:
        torch.manual_seed(0)
        model, self.make_batch, self.loss_fn = build(case, tiny, width)
        self.model = model.to(device)
        self.batch = {k: v.to(device) for k, v in self.make_batch().items()}
        self.plugin = attach(self.model, method, rank)
        self.forward_model = torch.compile(self.model) if compiled else self.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
        self.device, self.bf16 = device, bf16

    def step(self, steps: int = CYCLE) -> float:
        """Mean seconds per training step over ``steps`` consecutive steps."""
        return sum(sum(self.phases().values()) for _ in range(steps)) / steps

    def phases(self) -> dict:
        """Seconds spent in forward, backward, optimizer and ``plugin.step()`` for one step."""
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        marks = []

        def mark():
            sync()
            marks.append(time.perf_counter())

        mark()
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.forward_model, self.batch)
        mark()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        self.optimizer.step()
        mark()
        if self.plugin is not None:
            self.plugin.step()
        mark()
        return dict(zip(("forward", "backward", "optimizer", "plugin"), (b - a for a, b in zip(marks, marks[1:]))))


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors a block of code allocates, on any device.

    CPU has no allocator statistics, and the process's resident set is the allocator's story
    (pages it keeps, transients from imports), not the step's. Every op output's storage is
    counted once while it is alive; tensors from before the block are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views, detach, in-place and out= ops hand back memory that already exists
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._alive:
                    self._alive.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def peak_memory(runner: "Runner") -> int:
    """Peak bytes one more training step allocates on top of model, gradients and optimizer state."""
    runner.step(1)  # optimizer state and gradients exist from here on
    if runner.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step(1)
        return torch.cuda.max_memory_allocated() - base
    with TensorMemory() as tracker:
        runner.step(1)
    return tracker.peak


def timed_rounds(runners: dict, reps: int, warmup: int, sample=lambda runner: runner.step()) -> dict[str, list]:
    """``sample(runner)`` for every runner once per round (so slow drift hits all alike), warm-ups dropped."""
    samples = {name: [] for name in runners}
    for i in range(warmup + reps):
        for name, runner in runners.items():
            value = sample(runner)
            if i >= warmup:
                samples[name].append(value)
    return samples


def paired_ratio(numerator: list, denominator: list) -> float:
    """Median of the per-round ratios: robust to drift between rounds."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def floor_fraction(backprop: list, floor: list, rule: list) -> float:
    """Median over rounds of the share of the floor's saving a rule keeps."""
    return statistics.median((b - r) / (b - f) if b != f else float("nan") for b, f, r in zip(backprop, floor, rule))


def graph_breaks(runner: "Runner") -> int:
    """Graph breaks TorchDynamo reports for one forward of the runner's model."""
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda batch: runner.loss_fn(runner.model, batch))(runner.batch)
    torch._dynamo.reset()
    return explanation.graph_break_count


def measure(case: str, rank: int, reps: int, warmup: int, tiny: bool, device: str, with_memory: bool = True,
            methods=METHODS, compiled: bool = False, bf16: bool = False) -> dict:
    """Step time, speed-up, share of the floor's saving and peak memory of every method on one case."""
    runners = {m: Runner(case, m, rank, tiny, device, compiled=compiled, bf16=bf16) for m in methods}
    times = timed_rounds(runners, reps, warmup)
    memory = {m: peak_memory(runner) if with_memory else 0 for m, runner in runners.items()}
    bp = times["backprop"]
    result = {
        "case": case, "rank": rank, "device": device, "reps": reps, "compiled": compiled, "bf16": bf16,
        "step_s": {m: statistics.median(v) for m, v in times.items()},
        "speedup": {m: paired_ratio(bp, v) for m, v in times.items()},
        "floor_fraction": ({m: floor_fraction(bp, times["floor"], v) for m, v in times.items()}
                           if "floor" in times else {}),
        "memory_bytes": memory,
        "memory_ratio": {m: v / memory["backprop"] if memory["backprop"] else float("nan") for m, v in memory.items()},
    }
    if "bp-rule" in times:
        result["bp_rule_overhead"] = paired_ratio(times["bp-rule"], bp)
    if "svd" in runners:
        result["estimated_backward_saved"] = runners["svd"].plugin.cost()["backward_saved"]
    if compiled:
        result["graph_breaks"] = {m: graph_breaks(r) for m, r in runners.items()}
    return result


def cycle_phases(runner: "Runner") -> dict:
    """Mean seconds per phase over one cycle of ``CYCLE`` steps."""
    steps = [runner.phases() for _ in range(CYCLE)]
    return {k: statistics.mean(p[k] for p in steps) for k in steps[0]}


def phase_table(case: str, rank: int, reps: int, warmup: int, tiny: bool, device: str) -> dict:
    """Median seconds per phase for backprop and LDFA (interleaved), to see where time goes."""
    runners = {m: Runner(case, m, rank, tiny, device) for m in ("backprop", "floor", "svd")}
    samples = timed_rounds(runners, reps, warmup, sample=lambda runner: cycle_phases(runner))
    table = {m: {k: statistics.median(p[k] for p in v) for k in v[0]} for m, v in samples.items()}
    for method, row in table.items():
        cells = "  ".join(f"{k} {1000 * t:8.1f} ms" for k, t in row.items())
        print(f"{case:<6} {method:<9} {cells}", flush=True)
    return table


SWEEP_FIELDS = ["case", "device", "width", "rank", "tokens", "reps", "backprop_ms", "ldfa_ms", "speedup",
                "est_speedup", "mem_backprop_mb", "mem_ldfa_mb", "mem_ratio"]


def sweep(args) -> list[dict]:
    """Speed-up and memory ratio over widths × ranks, for pretraining (mlp) and LoRA (mlp-lora)."""
    from .harness import ResultTable, out_path

    out = out_path(args.out, "speed_sweep.csv", args.tiny)
    table = ResultTable(out, SWEEP_FIELDS, key=["case", "device", "width", "rank", "reps"])
    for case in ("mlp", "mlp-lora"):
        for width in args.widths:
            cells = table.missing([{"case": case, "device": args.device, "width": width, "rank": r, "reps": args.reps}
                                   for r in args.ranks])
            if not cells:
                continue
            backprop = Runner(case, "backprop", 0, args.tiny, args.device, width)
            mem_bp = peak_memory(backprop)
            for cell in cells:
                ldfa = Runner(case, "svd", cell["rank"], args.tiny, args.device, width)
                times = timed_rounds({"backprop": backprop, "ldfa": ldfa}, args.reps, args.warmup)
                cost = ldfa.plugin.cost()
                tokens = max(v.forward_samples for v in ldfa.plugin.layers.values())
                mem_ldfa = peak_memory(ldfa)
                del ldfa
                row = dict(cell, tokens=tokens,
                           backprop_ms=f"{1000 * statistics.median(times['backprop']):.1f}",
                           ldfa_ms=f"{1000 * statistics.median(times['ldfa']):.1f}",
                           speedup=f"{paired_ratio(times['backprop'], times['ldfa']):.3f}",
                           est_speedup=f"{(cost['forward'] + cost['backward_bp']) / (cost['forward'] + cost['backward_ldfa']):.3f}",
                           mem_backprop_mb=f"{mem_bp / 2**20:.1f}", mem_ldfa_mb=f"{mem_ldfa / 2**20:.1f}",
                           mem_ratio=f"{mem_ldfa / max(mem_bp, 1):.3f}")
                table.add(row)
                print(" ".join(f"{k}={row[k]}" for k in SWEEP_FIELDS), flush=True)
            del backprop
    rows = [r for r in table.rows if r["device"] == args.device and int(r["reps"]) == args.reps]
    plot_sweep(rows, out[:-4] + ".png")
    return rows


def plot_sweep(rows: list[dict], path: str) -> str:
    """Measured speed-up (solid) and the FLOP estimate of ``cost()`` (dashed) vs width, one colour per rank."""
    from .harness import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, case, title in zip(axes, ("mlp", "mlp-lora"), ("pretraining (all weights train)", f"LoRA r={LORA_R} (base frozen)")):
        for color, rank in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), sorted({int(r["rank"]) for r in rows})):
            cell = sorted((int(r["width"]), float(r["speedup"]), float(r["est_speedup"]))
                          for r in rows if r["case"] == case and int(r["rank"]) == rank)
            if cell:
                widths, measured, estimate = zip(*cell)
                ax.plot(widths, measured, "o-", color=color, label=f"r={rank} measured")
                ax.plot(widths, estimate, "--", color=color, lw=1, label=f"r={rank} FLOP estimate")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        widths = sorted({int(r["width"]) for r in rows})
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("layer width (4 layers, 1024 tokens per step)")
        ax.set_title(title)
    axes[0].set_ylabel("step-time speed-up backprop / LDFA")
    axes[1].legend(fontsize=7)
    return save_figure(fig, path)


TABLE_FIELDS = ["case", "device", "dtype", "compiled", "method", "rank", "reps", "step_ms", "speedup",
                "floor_fraction", "mem_mb", "mem_ratio", "graph_breaks"]


def table_rows(result: dict) -> list[dict]:
    """One CSV row per method of a ``measure`` result."""
    rows = []
    for method, seconds in result["step_s"].items():
        fraction = result["floor_fraction"].get(method)
        rows.append({
            "case": result["case"], "device": result["device"], "dtype": "bf16" if result["bf16"] else "fp32",
            "compiled": int(result["compiled"]), "method": method, "rank": result["rank"], "reps": result["reps"],
            "step_ms": f"{1000 * seconds:.1f}", "speedup": f"{result['speedup'][method]:.3f}",
            "floor_fraction": "" if fraction is None or method in ("backprop", "floor", "bp-rule") else f"{fraction:.3f}",
            "mem_mb": f"{result['memory_bytes'][method] / 2**20:.1f}",
            "mem_ratio": f"{result['memory_ratio'][method]:.3f}",
            "graph_breaks": result.get("graph_breaks", {}).get(method, ""),
        })
    return rows


def print_result(result: dict) -> None:
    tag = result["case"] + (" compiled" if result["compiled"] else "") + (" bf16" if result["bf16"] else "")
    print(f"{tag}: backprop {1000 * result['step_s']['backprop']:.1f} ms per step")
    rows = table_rows(result)
    w = max([11] + [len(row["method"]) for row in rows])
    print(f"  {'method':<{w}} {'step ms':>9} {'bp/method':>10} {'of floor':>9} {'mem MB':>8} {'mem/bp':>7}"
          + (f" {'graph breaks':>13}" if result["compiled"] else ""))
    for row in rows:
        fraction = f"{100 * float(row['floor_fraction']):.0f}%" if row["floor_fraction"] else ""
        print(f"  {row['method']:<{w}} {row['step_ms']:>9} {float(row['speedup']):>9.3f}x {fraction:>9} "
              f"{row['mem_mb']:>8} {row['mem_ratio']:>7}" + (f" {row['graph_breaks']:>13}" if result["compiled"] else ""),
              flush=True)


def write_rows(path: str, rows: list[dict]) -> None:
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, TABLE_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def table(args, cases, compiled: bool = False, bf16: bool = False, out: str | None = None) -> list[dict]:
    methods = ("backprop", "svd") if compiled else tuple(getattr(args, "methods", None) or METHODS)
    if "backprop" not in methods:
        methods = ("backprop", *methods)
    results = []
    for case in cases:
        result = measure(case, args.rank, args.reps, args.warmup, args.tiny, args.device,
                         with_memory=not args.no_memory, methods=methods, compiled=compiled, bf16=bf16)
        print_result(result)
        if out:
            write_rows(out, table_rows(result))
        results.append(result)
    return results


def gpu_suite(args) -> dict:
    """Everything a lent accelerator should measure, into CSVs under ``--out-dir``: the table (fp32,
    bf16 autocast, compiled), the per-phase split and the width × rank sweep."""
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    with open(os.path.join(out, "device.txt"), "w") as fh:
        fh.write(f"{name}\ntorch {torch.__version__}\n")
    print(f"device: {name}", flush=True)
    cases = list(CASES)
    suite = {
        "fp32": table(args, cases, out=os.path.join(out, "speed.csv")),
        "bf16": table(args, cases, bf16=True, out=os.path.join(out, "speed.csv")),
        "compiled": table(args, ["mlp", "llama"], compiled=True, out=os.path.join(out, "speed.csv")),
        "phases": [phase_table(c, args.rank, args.reps, args.warmup, args.tiny, args.device) for c in ("mlp", "llama")],
    }
    args.out = os.path.join(out, "speed_sweep.csv")
    suite["sweep"] = sweep(args)
    return suite


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["mlp", "llama", "llama-lora"], choices=CASES)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"methods to time (default: {' '.join(METHODS)}); also finetune (LDFAConfig.for_finetuning()), "
                             "streaming, any registered rule, and benchmarks.llm_sft variant strings (\"calibrated r32 top20\")")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="CSV file to append results to")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd (inductor) backprop and svd instead")
    parser.add_argument("--bf16", action="store_true", help="run the forward under bf16 autocast")
    parser.add_argument("--phases", action="store_true", help="per-phase medians (forward, backward, optimizer, plugin) instead")
    parser.add_argument("--no-memory", action="store_true", help="time only (skip the extra, tracked steps that measure memory)")
    parser.add_argument("--sweep", action="store_true", help="mlp and mlp-lora over --widths × --ranks, CSV and plot")
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--gpu-suite", action="store_true", help="table, bf16, compiled, phases and sweep into --out-dir")
    parser.add_argument("--out-dir", default="speed_suite")
    args = parser.parse_args(argv)
    if args.tiny:
        args.reps, args.warmup = 2, 1
    if args.gpu_suite:
        return gpu_suite(args)
    if args.sweep:
        return sweep(args)
    if args.phases:
        return [phase_table(case, args.rank, args.reps, args.warmup, args.tiny, args.device) for case in args.cases]
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} rank={args.rank} "
          f"(step = mean over {CYCLE} steps, median of {args.reps} rounds)")
    return table(args, args.cases, compiled=args.compile, bf16=args.bf16, out=args.out)


if __name__ == "__main__":
    main()
