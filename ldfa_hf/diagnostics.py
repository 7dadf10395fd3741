"""What a plugin can tell about itself: estimated cost, a printable summary, per-layer statistics
and the angle between LDFA's and backprop's gradients. Works on the public per-layer view
(``plugin.layers``), so it reads like any user code would."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .feedback import layer_input
from .rules import LayerCost


def estimate_cost(plugin) -> dict:
    """Multiply-adds per training step in the targeted layers, backprop vs LDFA.

    Uses the samples each layer saw in its last training forward (1 if it has not run).
    Layers whose input needs no gradient (e.g. the first layer) save nothing; frozen weights
    (LoRA's base) cost no ``δᵀx``, so there backprop's backward is all ``δ W``. The rule's own
    work and, for ``calibrated``, the exact calibration steps are averaged per step.
    """
    forward = bp_backward = ldfa_backward = rule_work = 0
    for view in plugin.layers.values():
        m, n = view.shape
        layer = LayerCost(m, n, view.rank, max(view.forward_samples, 1), view.module.weight.requires_grad,
                          view.input_grad)
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
    }


def summary_text(plugin) -> str:
    """Layers, ranks, feedback parameters and the estimated saving, as a small table."""
    config, rule, layers = plugin.config, plugin.rule, plugin.layers
    lines = [f"LDFA rule={config.rule!r} rank={config.rank} on {len(layers)} layers"
             + (f", exact calibration every {config.calibrate_every} steps" if rule.calibrates else "")]
    width = max([len(n) for n in layers] + [5])
    lines.append(f"{'layer':<{width}}  {'kind':<7} {'m x n':>13} {'rank':>5} {'feedback':>10}")
    feedback_params = 0
    for name, view in layers.items():
        m, n = view.shape
        params = view.rank * (m + n) if rule.has_factors else 0
        feedback_params += params
        lines.append(f"{name:<{width}}  {view.kind:<7} {f'{m} x {n}':>13} {view.rank:>5} {params:>10,}")
    cost = estimate_cost(plugin)
    lines.append(f"feedback parameters: {feedback_params:,}")
    lines.append(
        f"backward multiply-adds in targeted layers: {cost['backward_bp']:,} (backprop) -> "
        f"{cost['backward_ldfa']:,} (LDFA, rule included): {100 * cost['backward_saved']:.1f}% saved, "
        f"{100 * cost['step_saved']:.1f}% of their forward+backward"
    )
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
