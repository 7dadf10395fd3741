"""Training-step time and peak memory: backprop vs LDFA, measured side by side in one run.

Cases:
  mlp         4 × Linear(2048) + GELU, batch 1024, r = 32 (pretraining: every weight trains)
  llama       Llama-style decoder: hidden 768, intermediate 2048, 4 layers, 12 heads,
              seq 256, vocab 8000, batch 4, r = 32
  mlp-lora    the mlp with its weights frozen and PEFT LoRA (r = 8) adapters on every layer
  llama-lora  the llama, frozen, LoRA (r = 8) on every attention and MLP projection

For each case: the median step time (forward + backward + fused AdamW + plugin.step()) of a
never-wrapped model, of LDFA (svd rule) and of ``rule="bp"``, repetitions interleaved so
drift hits all alike (ratios are medians of per-round ratios); and the peak memory a step
allocates on top of weights, gradients and optimizer state (CUDA: max allocated; CPU: the
live tensors the step creates, counted by ``TensorMemory``).

    python -m benchmarks.speed                  # mlp and llama, 7 repetitions
    python -m benchmarks.speed --cases llama-lora mlp-lora
    python -m benchmarks.speed --phases         # where the time goes: forward, backward, optimizer, plugin
    python -m benchmarks.speed --sweep          # mlp and mlp-lora over widths 512–4096 × ranks 8–128, with plot
    python -m benchmarks.speed --tiny           # seconds, for the tests
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ldfa_hf

METHODS = ("backprop", "ldfa", "bp-rule")


CASES = ("mlp", "llama", "mlp-lora", "llama-lora")
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
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


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
    """One model + optimizer (+ plugin) that can take a timed training step."""

    def __init__(self, case: str, method: str, rank: int, tiny: bool, device: str, width: int | None = None) -> None:
        torch.manual_seed(0)
        model, self.make_batch, self.loss_fn = build(case, tiny, width)
        self.model = model.to(device)
        self.batch = {k: v.to(device) for k, v in self.make_batch().items()}
        self.plugin = None
        if method != "backprop":
            rule = "svd" if method == "ldfa" else "bp"
            self.plugin = ldfa_hf.wrap(self.model, ldfa_hf.LDFAConfig(rank=rank, rule=rule))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
        self.device = device

    def step(self) -> float:
        return sum(self.phases().values())

    def phases(self) -> dict:
        """Seconds spent in forward, backward, optimizer and ``plugin.step()`` for one step."""
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        marks = []

        def mark():
            sync()
            marks.append(time.perf_counter())

        mark()
        loss = self.loss_fn(self.model, self.batch)
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
    runner.step()  # optimizer state and gradients exist from here on
    if runner.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step()
        return torch.cuda.max_memory_allocated() - base
    with TensorMemory() as tracker:
        runner.step()
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


def measure(case: str, rank: int, reps: int, warmup: int, tiny: bool, device: str, with_memory: bool = True) -> dict:
    runners = {m: Runner(case, m, rank, tiny, device) for m in METHODS}
    times = timed_rounds(runners, reps, warmup)
    estimate = runners["ldfa"].plugin.cost()
    memory = {m: peak_memory(runner) if with_memory else 0 for m, runner in runners.items()}
    return {
        "case": case, "rank": rank, "device": device, "reps": reps,
        "step_s": {m: statistics.median(v) for m, v in times.items()},
        "speedup_ldfa": paired_ratio(times["backprop"], times["ldfa"]),
        "bp_rule_overhead": paired_ratio(times["bp-rule"], times["backprop"]),
        "memory_bytes": memory,
        "memory_ratio_ldfa": memory["ldfa"] / memory["backprop"] if memory["backprop"] else float("nan"),
        "estimated_backward_saved": estimate["backward_saved"],
        "estimated_step_saved_in_targets": estimate["step_saved"],
    }


def phase_table(case: str, rank: int, reps: int, warmup: int, tiny: bool, device: str) -> dict:
    """Median seconds per phase for backprop and LDFA (interleaved), to see where time goes."""
    runners = {m: Runner(case, m, rank, tiny, device) for m in ("backprop", "ldfa")}
    samples = timed_rounds(runners, reps, warmup, sample=lambda runner: runner.phases())
    table = {m: {k: statistics.median(p[k] for p in v) for k in v[0]} for m, v in samples.items()}
    for method, row in table.items():
        cells = "  ".join(f"{k} {1000 * t:8.1f} ms" for k, t in row.items())
        print(f"{case:<6} {method:<9} {cells}", flush=True)
    return table


SWEEP_FIELDS = ["case", "device", "width", "rank", "tokens", "reps", "backprop_ms", "ldfa_ms", "speedup",
                "est_speedup", "mem_backprop_mb", "mem_ldfa_mb", "mem_ratio"]


def sweep(args) -> list[dict]:
    """Speed-up and memory ratio over widths × ranks, for pretraining (mlp) and LoRA (mlp-lora)."""
    from .harness import RESULTS, ResultTable

    out = args.out or os.path.join(RESULTS, "speed_sweep.csv")
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
                ldfa = Runner(case, "ldfa", cell["rank"], args.tiny, args.device, width)
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


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["mlp", "llama"], choices=CASES)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="CSV file to append results to")
    parser.add_argument("--phases", action="store_true", help="per-phase medians (forward, backward, optimizer, plugin) instead")
    parser.add_argument("--no-memory", action="store_true", help="time only (skip the extra, tracked steps that measure memory)")
    parser.add_argument("--sweep", action="store_true", help="mlp and mlp-lora over --widths × --ranks, CSV and plot")
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args(argv)
    if args.tiny:
        args.reps, args.warmup = 2, 1
    if args.sweep:
        return sweep(args)
    if args.phases:
        return [phase_table(case, args.rank, args.reps, args.warmup, args.tiny, args.device) for case in args.cases]
    results = []
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':<6} {'backprop ms':>12} {'ldfa ms':>9} {'bp/ldfa':>8} {'bp-rule/never':>14} "
          f"{'mem bp MB':>10} {'mem ldfa MB':>12} {'mem ratio':>10} {'est. bwd saved':>15}")
    for case in args.cases:
        r = measure(case, args.rank, args.reps, args.warmup, args.tiny, args.device, with_memory=not args.no_memory)
        results.append(r)
        s, mem = r["step_s"], r["memory_bytes"]
        print(f"{case:<6} {1000 * s['backprop']:>12.1f} {1000 * s['ldfa']:>9.1f} {r['speedup_ldfa']:>7.3f}x "
              f"{r['bp_rule_overhead']:>13.3f}x {mem['backprop'] / 2**20:>10.1f} {mem['ldfa'] / 2**20:>12.1f} "
              f"{r['memory_ratio_ldfa']:>10.3f} {100 * r['estimated_backward_saved']:>14.1f}%", flush=True)
    if args.out:
        new = not os.path.exists(args.out)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["case", "device", "rank", "reps", "backprop_ms", "ldfa_ms", "bp_rule_ms",
                                 "speedup", "bp_rule_overhead", "mem_backprop_mb", "mem_ldfa_mb", "mem_ratio",
                                 "est_backward_saved"])
            for r in results:
                s, mem = r["step_s"], r["memory_bytes"]
                writer.writerow([r["case"], r["device"], r["rank"], r["reps"], f"{1000 * s['backprop']:.1f}",
                                 f"{1000 * s['ldfa']:.1f}", f"{1000 * s['bp-rule']:.1f}", f"{r['speedup_ldfa']:.3f}",
                                 f"{r['bp_rule_overhead']:.3f}", f"{mem['backprop'] / 2**20:.1f}",
                                 f"{mem['ldfa'] / 2**20:.1f}", f"{r['memory_ratio_ldfa']:.3f}",
                                 f"{r['estimated_backward_saved']:.3f}"])
    return results


if __name__ == "__main__":
    main()
