"""Training-step time and peak memory: backprop vs LDFA, measured side by side in one run.

Cases (issue #2):
  mlp    4 × Linear(2048) + GELU, batch 1024, r = 32
  llama  Llama-style decoder: hidden 768, intermediate 2048, 4 layers, 12 heads,
         seq 256, vocab 8000, batch 4, r = 32

For each case: the median step time (forward + backward + fused AdamW + plugin.step()) of a
never-wrapped model, of LDFA (svd rule) and of ``rule="bp"``, repetitions interleaved so
drift hits all alike (ratios are medians of per-round ratios); and the peak memory of each (CUDA: max allocated; CPU: the peak
resident set of a fresh process, minus its size before the first step).

    python -m benchmarks.speed                  # both cases, 7 repetitions
    python -m benchmarks.speed --phases         # where the time goes: forward, backward, optimizer, plugin
    python -m benchmarks.speed --tiny           # seconds, for the tests
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import ldfa_hf

METHODS = ("backprop", "ldfa", "bp-rule")


def build(case: str, tiny: bool):
    """(model, make_batch, loss_fn) for a case; ``tiny`` shrinks it to run in seconds."""
    if case == "mlp":
        width, batch = (64, 32) if tiny else (2048, 1024)
        layers = []
        for _ in range(4):
            layers += [nn.Linear(width, width), nn.GELU()]
        model = nn.Sequential(*layers[:-1])
        x = torch.randn(batch, width)
        target = torch.randn(batch, width)
        return model, lambda: {"input": x}, lambda model, b: nn.functional.mse_loss(model(b["input"]), target)
    if case == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, inter, layers, heads, seq, vocab, batch = (
            (32, 64, 2, 4, 16, 128, 2) if tiny else (768, 2048, 4, 12, 256, 8000, 4)
        )
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        return model, lambda: {"input_ids": ids, "labels": ids}, lambda model, b: model(**b).loss
    raise ValueError(f"unknown case {case!r}; choose mlp or llama")


class Runner:
    """One model + optimizer (+ plugin) that can take a timed training step."""

    def __init__(self, case: str, method: str, rank: int, tiny: bool, device: str) -> None:
        torch.manual_seed(0)
        model, self.make_batch, self.loss_fn = build(case, tiny)
        self.model = model.to(device)
        self.batch = {k: v.to(device) for k, v in self.make_batch().items()}
        self.plugin = None
        if method != "backprop":
            rule = "svd" if method == "ldfa" else "bp"
            self.plugin = ldfa_hf.wrap(self.model, ldfa_hf.LDFAConfig(rank=rank, rule=rule))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(case: str, method: str, rank: int, tiny: bool, device: str) -> int:
    """Bytes of peak memory a training step adds on top of model + optimizer state."""
    if device.startswith("cuda"):
        runner = Runner(case, method, rank, tiny, device)
        runner.step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step()
        return torch.cuda.max_memory_allocated() - base
    # CPU: a fresh process per method, since the resident-set peak only ever rises
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--memory-probe", case, method, str(rank)] + (["--tiny"] if tiny else []),
        capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return int(out.stdout.strip().splitlines()[-1])


def _memory_probe(case: str, method: str, rank: int, tiny: bool) -> None:
    runner = Runner(case, method, rank, tiny, "cpu")
    runner.step()  # optimizer state and gradients exist from here on
    base = _rss_bytes()
    runner.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(max(peak - base, 0))


def measure(case: str, rank: int, reps: int, warmup: int, tiny: bool, device: str) -> dict:
    runners = {m: Runner(case, m, rank, tiny, device) for m in METHODS}
    times = {m: [] for m in METHODS}
    for i in range(warmup + reps):
        for method in METHODS:  # interleaved, so slow drift hits every method alike
            t = runners[method].step()
            if i >= warmup:
                times[method].append(t)
    median = {m: statistics.median(v) for m, v in times.items()}
    # ratios within each interleaved round, then their median: robust to slow drift
    paired = statistics.median(b / l for b, l in zip(times["backprop"], times["ldfa"]))
    paired_bp_rule = statistics.median(r / b for b, r in zip(times["backprop"], times["bp-rule"]))
    estimate = runners["ldfa"].plugin.cost()
    del runners
    memory = {m: peak_memory(case, m, rank, tiny, device) for m in METHODS}
    return {
        "case": case, "rank": rank, "device": device, "reps": reps,
        "step_s": median,
        "speedup_ldfa": paired,
        "bp_rule_overhead": paired_bp_rule,
        "memory_bytes": memory,
        "memory_ratio_ldfa": memory["ldfa"] / max(memory["backprop"], 1),
        "estimated_backward_saved": estimate["backward_saved"],
        "estimated_step_saved_in_targets": estimate["step_saved"],
    }


def phase_table(case: str, rank: int, reps: int, warmup: int, tiny: bool, device: str) -> dict:
    """Median seconds per phase for backprop and LDFA (interleaved), to see where time goes."""
    runners = {m: Runner(case, m, rank, tiny, device) for m in ("backprop", "ldfa")}
    samples = {m: [] for m in runners}
    for i in range(warmup + reps):
        for method, runner in runners.items():
            phases = runner.phases()
            if i >= warmup:
                samples[method].append(phases)
    table = {m: {k: statistics.median(p[k] for p in v) for k in v[0]} for m, v in samples.items()}
    for method, row in table.items():
        cells = "  ".join(f"{k} {1000 * t:8.1f} ms" for k, t in row.items())
        print(f"{case:<6} {method:<9} {cells}", flush=True)
    return table


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["mlp", "llama"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None, help="CSV file to append results to")
    parser.add_argument("--phases", action="store_true", help="per-phase medians (forward, backward, optimizer, plugin) instead")
    parser.add_argument("--memory-probe", nargs=3, metavar=("CASE", "METHOD", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        case, method, rank = args.memory_probe
        _memory_probe(case, method, int(rank), args.tiny)
        return []
    if args.tiny:
        args.reps, args.warmup = 2, 1
    if args.phases:
        return [phase_table(case, args.rank, args.reps, args.warmup, args.tiny, args.device) for case in args.cases]
    results = []
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':<6} {'backprop ms':>12} {'ldfa ms':>9} {'bp/ldfa':>8} {'bp-rule/never':>14} "
          f"{'mem bp MB':>10} {'mem ldfa MB':>12} {'mem ratio':>10} {'est. bwd saved':>15}")
    for case in args.cases:
        r = measure(case, args.rank, args.reps, args.warmup, args.tiny, args.device)
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
