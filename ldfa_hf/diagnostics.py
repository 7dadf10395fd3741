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

from .cost import LayerCost
from .feedback import layer_input
from .layers import kind_of
from .targets import classifier_head, unused_copies


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


def _spans(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    values, out = sorted(set(values)), []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def group_name(names: list[str]) -> str:
    """Names of one role with each starred index written as the indices it stands for:
    ``model.layers.[0-9].mlp.up_proj``, ``[0,2]`` for a Sequential's layers."""
    parts = [n.split(".") for n in names]
    if len({len(p) for p in parts}) != 1:
        return role(names[0])
    out = []
    for column in zip(*parts):
        if len(set(column)) == 1:
            out.append(column[0])
        elif all(c.isdigit() for c in column):
            out.append(f"[{_spans([int(c) for c in column])}]")
        else:
            out.append("*")
    return ".".join(out)


def _block(name: str) -> Optional[int]:
    """The block index in a layer's name (its last number followed by more name), if any."""
    found = re.findall(r"(?:^|\.)(\d+)\.", name)
    return int(found[-1]) if found else None


def _where(names: list[str]) -> str:
    blocks = [b for b in (_block(n) for n in names) if b is not None]
    others = [n for n in names if _block(n) is None]
    parts = ([f"blocks {_spans(blocks)}"] if blocks else []) + others[:3] + (["..."] if len(others) > 3 else [])
    return ", ".join(parts)


def _branch_rates(plugin) -> dict[int, float]:
    """id(module) → the probability that its branch skips a step, for every module in a branch."""
    rates = {}
    for view, hook in zip(plugin.branches.values(), plugin._branches.values()):
        for end in (hook.branch.input_module, hook.branch.output_module):
            for module in end.modules():
                rates[id(module)] = view.rate
    return rates


def linear_layers(model) -> list[tuple]:
    """(name, module, layer kind) of every linear layer that runs in forward, in module order
    (the copies of a PEFT ``modules_to_save`` head that never run are left out)."""
    unused = unused_copies(model)
    return [(name, module, kind) for name, module in model.named_modules()
            if (kind := kind_of(module)) is not None and name not in unused]


def whole_model_cost(plugin, samples: Optional[int] = None, linears: Optional[list] = None) -> dict:
    """Multiply-adds of every linear layer of the model per step (targeted by LDFA or not, LoRA's
    adapters included), backprop vs this plugin's configuration: LDFA's layers as ``estimate_cost``
    counts them, the exact LM head's unscored rows skipped (``forward_ldfa``: in its forward too), a
    branch's layers scaled by the share of steps it runs. Attention's core, norms and activations are not counted. ``linears``:
    ``linear_layers(plugin.model)``, if the caller has it already."""
    views = {id(v.module): v for v in plugin.layers.values()}
    seen = sorted(v.forward_samples for v in views.values() if v.forward_samples)
    N = samples or (seen[len(seen) // 2] if seen else ASSUMED_SAMPLES)
    rates = _branch_rates(plugin) if plugin.branches else {}
    head = plugin._head
    forward = forward_ldfa = bp = ldfa = 0.0
    for _, module, kind in linears if linears is not None else linear_layers(plugin.model):
        m, n = kind.shape(module)
        share = 1.0  # of the rows its forward computes
        if id(module) in views:
            view = views[id(module)]
            layer = LayerCost(m, n, view.rank, samples or view.forward_samples or N,
                              view.module.weight.requires_grad, view.input_grad)
            exact, (feedback, work) = layer.exact_backward, plugin.rule.cost(layer, plugin.config)
            mine = feedback + work
        else:
            trains = bool(getattr(module.weight, "requires_grad", False))
            exact = N * m * n * (1 + trains)
            mine = exact
            if head is not None and module is head.module and head.rows_seen:
                kept = head.rows_kept / head.rows_seen
                # a trainable head's backward is autograd's, over the rows its forward kept
                mine = exact * kept if head.forward_skips or not trains else exact
                share = kept if head.forward_skips else 1.0
        forward += N * m * n
        forward_ldfa += N * m * n * share
        bp += exact
        ldfa += (1 - rates.get(id(module), 0.0)) * mine
    return {"forward": forward, "forward_ldfa": forward_ldfa, "backward_bp": bp, "backward_ldfa": ldfa,
            "backward_saved": 1 - ldfa / bp if bp else 0.0,
            "step_saved": (forward + bp - forward_ldfa - ldfa) / (forward + bp) if bp else 0.0}


def summary_text(plugin, samples: Optional[int] = None) -> str:
    """What runs how (exact backprop, LDFA feedback, skipped branches), one line per group of
    same-role, same-shape LDFA layers with the blocks they sit in, the feedback parameters, and
    the estimated saving of the whole model's linear layers (with the rows per step it assumed)."""
    config, rule, layers = plugin.config, plugin.rule, plugin.layers
    model = plugin.model
    targeted = {id(v.module) for v in layers.values()}
    linears = linear_layers(model)
    frozen_or_trained = [(name, module, kind) for name, module, kind in linears if "lora_" not in name]
    exact = [name for name, module, _ in frozen_or_trained if id(module) not in targeted]
    groups: dict[tuple, list] = {}
    for name, view in layers.items():
        groups.setdefault((role(name), view.kind, view.shape, view.rank), []).append(name)
    what = (f"run exact backprop through LDFA's hooks (rule {config.rule!r})" if rule.exact
            else f"get rank-{config.rank} feedback (rule {config.rule!r})")
    lines = [f"LDFA on {type(model).__name__}: {len(layers)} layers {what}, {len(exact)} frozen or trained layers "
             "keep exact backprop"]
    schedule = rule.describe()
    lines.append(f"  {'LDFA hooks:    ' if rule.exact else 'LDFA feedback: '} {_where(list(layers)) or '-'}"
                 + (f" ({schedule})" if schedule else ""))
    if exact:
        lines.append(f"  exact backprop: {_where(exact)}" + (f" (the top {config.exact_top:.0%} of the targeted "
                                                           f"layers: exact_top={config.exact_top})"
                                                           if config.exact_top else ""))
    head = plugin._head
    if head is not None:
        m, n = head.module.weight.shape
        seen = (f"; last training step: {head.rows_kept:,} of {head.rows_seen:,} rows"
                + (", forward and backward" if head.forward_skips else ", backward") if head.rows_seen else "")
        forward = "forward: with labels in the model's own LM loss; " if head.lm is not None else ""
        lines.append(f"  {head.name} ({m} x {n}) is exact and computes only the rows the loss scores "
                     f"({forward}backward: its error's non-zero rows){seen}")
    elif frozen_or_trained:
        scores = classifier_head(model)
        name, module = scores or frozen_or_trained[-1][:2]  # else the output layer: the last linear layer that runs
        lines.append(f"  {'classification head' if scores else 'output layer'}: {name} "
                     f"({' x '.join(map(str, kind_of(module).shape(module)))}), "
                     + ("LDFA feedback" if id(module) in targeted else "exact backprop"))
    if plugin.branches:
        views = list(plugin.branches.values())
        tails = ", their output projections still learning (branch_tail)" if config.branch_tail else ""
        always = [v for v in views if v.rate >= 1.0]
        found = f"  residual branches: {len(views)} ({_where([v.name + '.' for v in views])}); "
        if config.branch_allocation == "bottom" and always:
            depths = sorted({v.depth for v in always})
            lines.append(f"{found}the bottom {len(always)} (blocks {depths[0]}-{depths[-1]}) skip their backward on "
                         f"every step{tails}; the LDFA layers inside them send no feedback")
        elif config.branch_allocation == "cut":
            lo, hi = plugin.cut_bounds()
            lines.append(f"{found}each step the bottom {lo}-{hi} of them (a random depth, uniform; "
                         f"~{100 * config.skip_branches:.0f}% on average) skip their backward, every branch above "
                         f"runs exact{tails}")
        else:
            lines.append(f"{found}each step skips ~{100 * config.skip_branches:.0f}% of their backward "
                         f"({config.branch_allocation} rates, {max(v.rate for v in views):.0%} at most){tails}"
                         + (f", bridged at rank {config.branch_bridge}" if config.branch_bridge else ""))
    width = max([len(group_name(v)) for v in groups.values()] + [5])
    lines.append(f"{'count':>5}  {'LDFA layer':<{width}}  {'kind':<7} {'m x n':>13} {'rank':>5} {'feedback':>11}")
    feedback_params = 0
    for (_, kind, (m, n), rank), names in groups.items():
        params = rank * (m + n) * len(names) if rule.has_factors else 0
        feedback_params += params
        lines.append(f"{len(names):>5}  {group_name(names):<{width}}  {kind:<7} {f'{m} x {n}':>13} {rank:>5} {params:>11,}")
    lines.append(f"feedback parameters: {feedback_params:,}")
    cost = estimate_cost(plugin, samples)
    whole = whole_model_cost(plugin, samples, linears)
    if samples:
        rows = f"{samples:,} rows (tokens) per layer and step, as given"
    elif cost["assumed"]:
        rows = (f"{ASSUMED_SAMPLES:,} rows (tokens) per layer and step, assumed: no training forward seen yet "
                "(pass summary(samples=...) or call it after a step)")
    else:
        rows = "the rows (tokens) each layer saw in its last training forward"
    saved = whole["backward_saved"]
    head_forward = ", the head's unscored forward rows included" if whole["forward_ldfa"] < whole["forward"] else ""
    verdict = (f"{100 * saved:.1f}% fewer ({100 * whole['step_saved']:.1f}% of forward+backward{head_forward})"
               if saved > 0 else "no saving at this size (the rule's own work outweighs it)")
    lines.append(f"estimated backward multiply-adds of all {len(exact) + len(layers)} linear layers at {rows}: "
                 f"{whole['backward_bp']:,.0f} (backprop) -> {whole['backward_ldfa']:,.0f} (this configuration, rule "
                 f"included): {verdict}"
                 + (f"; in the LDFA layers alone {100 * cost['backward_saved']:.1f}% fewer" if cost["backward_saved"] > 0
                    else "") + ". An upper bound on the time saved, not a wall-clock measurement.")
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
