"""What a plugin can tell about itself: estimated cost, a printable summary, per-layer statistics
and the angle between LDFA's and backprop's gradients. Works on the public per-layer view
(``plugin.layers``), so it reads like any user code would."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .feedback import layer_input
from .cost import LayerCost


ASSUMED_SAMPLES = 512  # rows per layer and step when no training forward has been seen yet


def estimate_cost(plugin, samples: Optional[int] = None) -> dict:
    """Multiply-adds per training step in the targeted layers, backprop vs LDFA.

    Uses ``samples`` rows (tokens, or image positions) per layer if given, else what each layer
    saw in its last training forward, else ``ASSUMED_SAMPLES`` (``"assumed"`` says which).
    Layers whose input needs no gradient (e.g. the first layer) save nothing; frozen weights
    (LoRA's base) cost no ``δᵀx``, so there backprop's backward is all ``δ W``. The rule's own
    work and, for rules with exact steps, those steps are averaged per step. An estimate of
    multiply-adds, an upper bound on the wall-clock saving (the hooks and the rest of the
    step are not counted).
    """
    forward = bp_backward = ldfa_backward = rule_work = 0
    assumed = False
    for view in plugin.layers.values():
        m, n = view.shape
        N = samples or view.forward_samples
        if not N:
            N, assumed = ASSUMED_SAMPLES, True
        layer = LayerCost(m, n, view.rank, N, view.module.weight.requires_grad, view.input_grad)
        forward += layer.N * m * n
        bp_backward += layer.exact_backward
        backward, work = plugin.rule.cost(layer, plugin.config)
        ldfa_backward += backward
        rule_work += work
    return {
        "forward": forward,
        "backward_bp": bp_backward,
        "backward_ldfa": ldfa_backward,
        "rule": rule_work,
        "backward_saved": 1 - ldfa_backward / bp_backward if bp_backward else 0.0,
        "step_saved": (bp_backward - ldfa_backward) / (forward + bp_backward) if bp_backward else 0.0,
        "assumed": assumed,
    }


def role(name: str) -> str:
    """A layer's name with its block indices starred: ``model.layers.*.mlp.up_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


def summary_text(plugin, samples: Optional[int] = None) -> str:
    """One line per group of same-role, same-shape layers, the feedback parameters and the estimated
    saving (with the rows per step it assumed), so that it reads at the size of an LLM."""
    config, rule, layers = plugin.config, plugin.rule, plugin.layers
    groups: dict[tuple, list] = {}
    for name, view in layers.items():
        groups.setdefault((role(name), view.kind, view.shape, view.rank), []).append(view)
    schedule = rule.describe()
    lines = [f"LDFA rule={config.rule!r} rank={config.rank} on {len(layers)} layers in {len(groups)} groups"
             + (f" ({schedule})" if schedule else "")]
    width = max([len(key[0]) for key in groups] + [5])
    lines.append(f"{'count':>5}  {'layer':<{width}}  {'kind':<7} {'m x n':>13} {'rank':>5} {'feedback':>11}")
    feedback_params = 0
    for (name, kind, (m, n), rank), views in groups.items():
        params = rank * (m + n) * len(views) if rule.has_factors else 0
        feedback_params += params
        lines.append(f"{len(views):>5}  {name:<{width}}  {kind:<7} {f'{m} x {n}':>13} {rank:>5} {params:>11,}")
    cost = estimate_cost(plugin, samples)
    lines.append(f"feedback parameters: {feedback_params:,}")
    head = plugin._head
    if head is not None:
        m, n = head.module.weight.shape
        seen = (f" (last training backward: {head.rows_kept:,} of {head.rows_seen:,} rows)"
                if head.rows_seen else "")
        lines.append(f"{head.name} ({m} x {n}) stays exact; its backward multiplies only the rows of its "
                     f"error that are not zero, the scored tokens{seen}")
    if samples:
        rows = f"{samples:,} rows (tokens) per layer and step, as given"
    elif cost["assumed"]:
        rows = (f"{ASSUMED_SAMPLES:,} rows (tokens) per layer and step, assumed: no training forward seen yet "
                "(pass summary(samples=...) or call it after a step)")
    else:
        rows = "the rows (tokens) each layer saw in its last training forward"
    saved = cost["backward_saved"]
    verdict = (f"{100 * saved:.1f}% fewer, {100 * cost['step_saved']:.1f}% of their forward+backward"
               if saved > 0 else "no saving at this size (the rule's own work outweighs it)")
    lines.append(f"estimated backward multiply-adds in targeted layers at {rows}: {cost['backward_bp']:,} (backprop) -> "
                 f"{cost['backward_ldfa']:,} (LDFA, rule included): {verdict}. "
                 "An upper bound on the time saved, not a wall-clock measurement.")
    return "\n".join(lines)


def layer_stats(plugin, batch: Any = None, loss_fn: Optional[Callable[[Any], Tensor]] = None) -> dict:
    """Relative feedback error ‖PQ − W‖/‖W‖ and skipped updates per layer; with ``batch``, also the
    angle (degrees) between LDFA's and backprop's gradient at each layer's input."""
    rule, layers = plugin.rule, plugin.layers
    result_layers = {}
    for name, view in layers.items():
        if rule.exact:
            error = 0.0
        elif not rule.has_factors:
            error = float("nan")  # dfa: no P Q standing in for W
        else:
            W = view.weight().float()
            norm = float(W.norm())
            error = float((view.P @ view.Q - W).norm()) / norm if norm > 0 else float("nan")
        result_layers[name] = {"feedback_error": error, "skipped": view.skipped}
    if batch is not None:
        for name, angle in gradient_angles(plugin, batch, loss_fn).items():
            result_layers[name]["angle"] = angle
    errors = [v["feedback_error"] for v in result_layers.values() if math.isfinite(v["feedback_error"])]
    angles = [v["angle"] for v in result_layers.values() if "angle" in v]
    result = {
        "step": plugin.num_steps,
        "skipped_updates": sum(v.skipped for v in layers.values()),
        "mean_feedback_error": sum(errors) / len(errors) if errors else float("nan"),
        "layers": result_layers,
    }
    if batch is not None:
        result["mean_angle"] = sum(angles) / len(angles) if angles else float("nan")
    return result


def gradient_angles(plugin, batch: Any, loss_fn: Optional[Callable] = None) -> dict[str, float]:
    """Angle between the gradients each layer's input receives under LDFA and under backprop,
    on the same batch, dropout masks and buffers; the model's ``.grad`` and the rule's
    statistics are left alone."""
    model = plugin.model
    if model is None:
        raise RuntimeError("stats(batch) needs an attached plugin")
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    grads: dict[str, dict] = {}
    inputs: dict[str, Tensor] = {}

    def capture(name):
        def hook(module, args, kwargs):
            x = layer_input(args, kwargs)
            if x is not None and torch.is_grad_enabled():
                inputs[name] = x
        return hook

    # prepended, so they see each layer's real input before LDFA hands the layer a detached one
    handles = [view.module.register_forward_pre_hook(capture(name), prepend=True, with_kwargs=True)
               for name, view in plugin.layers.items()]
    try:
        with torch.random.fork_rng(devices=devices), plugin.statistics_paused():
            seed = torch.randint(0, 2**31 - 1, ()).item()
            for mode in ("ldfa", "bp"):
                torch.manual_seed(seed)
                inputs.clear()
                context = plugin.disabled() if mode == "bp" else contextlib.nullcontext()
                with context, torch.enable_grad():
                    output = model(**batch) if isinstance(batch, Mapping) else model(batch)
                    loss = loss_fn(output) if loss_fn is not None else output.loss
                    names = [n for n, x in inputs.items() if x.requires_grad]
                    values = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True) if names else []
                grads[mode] = dict(zip(names, values))
                with torch.no_grad():
                    for key, buf in model.named_buffers():
                        buf.copy_(buffers[key])
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
    angles = {}
    for name, g in grads["ldfa"].items():
        ref = grads["bp"].get(name)
        if g is None or ref is None:
            continue
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(), ref.flatten().double(), dim=0)
        angles[name] = math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))
    return angles
