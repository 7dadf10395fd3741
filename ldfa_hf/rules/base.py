"""`Rule`: the one home of a feedback rule — how P and Q start, how the error goes down, how they learn.

The plugin and the hooks are plumbing that knows no rule by name. A rule is a subclass of
``Rule`` that overrides what it needs; every method has a default that does plain LDFA with
fixed factors. ``register_rule(cls)`` makes it available as ``LDFAConfig(rule=cls.name)``.

What a new rule overrides (the rest it inherits):

- **Start** — ``init_factors(W, r, generator)``: the layer's first (P, Q), or ``None`` for a rule
  without factors. ``attach(layers)`` sees every layer once, after they exist.
- **What it needs from backward** — ``collects(layer)``: whether the coming backward gathers
  statistics for this layer; ``needs_input``: whether those statistics read the layer input x;
  ``statistics(layer, g, z, x)``: this micro-batch's sums; ``stat_shapes(layer)``: their shapes
  (absent ones are padded with zeros before the all-reduce of a distributed run).
- **How it sends the error down** — ``input_grad(layer, g, x, x_shape, need_gx, collect)``:
  the gradient for the layer's input (default ``(δ P) Q``); call ``layer.accumulate`` for statistics.
- **How it learns at ``plugin.step()``** — ``update(layers, step)``. A rule with ``trains = True``
  gets AdamW on its factors and only needs ``gradients(layers)``; a rule that writes factors
  directly calls ``set_factors`` (one finiteness check, skipped updates counted).
  ``begin_step(step)`` runs before every step's forward (e.g. to decide an exact step), and
  ``refreshes`` re-initialises the factors from W every ``refresh_every`` steps.
- **Its cost** — ``cost(layer, config)`` and ``work(layer, config)``, multiply-adds per step.
- **Its per-layer state** — ``layer.state``, a dict the rule owns; ``state_dict`` /
  ``load_state_dict`` / ``unexpected_state`` put it (and the optimizer's) into checkpoints.
- **Its own settings** — ``options``, ``{name: default}``; ``LDFAConfig(rule_options=...)`` is
  checked against it (``check_options``) and the values land in ``self.options``. ``settings``
  names the shared ``LDFAConfig`` fields the rule reads beyond rank and targets.

Example:
    >>> class HalfFeedback(ldfa_hf.Rule):
    ...     name = "half"
    ...     def input_grad(self, layer, g, x, x_shape, need_gx, collect):
    ...         gx = super().input_grad(layer, g, x, x_shape, need_gx, collect)
    ...         return None if gx is None else gx / 2
    >>> ldfa_hf.register_rule(HalfFeedback)
    >>> plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule="half"))
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from ..cost import LayerCost
from ..linalg import random_factors
from ..warning import LDFAWarning


class Rule:
    """Base rule: fixed random factors, no statistics, no training (see the module docstring)."""

    name = ""
    label = ""          # how tables and plots name it
    full_rank = False   # always uses min(m, n), whatever ``rank`` says
    has_factors = True  # layers carry P and Q made at attach time
    needs_input = False  # its statistics read the layer input x (kept alive until backward)
    trains = False      # P, Q have an AdamW optimizer, fed by ``gradients``
    refreshes = False   # re-initialised from W every ``refresh_every`` steps
    exact = False       # sends the exact error down (diagnostics report no feedback error)
    options: dict = {}  # rule_options this rule accepts, with their defaults
    settings: tuple = ()  # LDFAConfig fields it reads beyond rank, targets, error_clip and seed
    state_keys: tuple = ()  # the tensors a rule keeps in ``layer.state`` for checkpoints
    lr = 0.0
    weight_decay = 0.0
    error_clip: Optional[float] = None
    grad_clip: Optional[float] = None

    def __init__(self, config) -> None:
        self.config = config
        self.options = {**type(self).options, **self.check_options(config.rule_options)}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._warned_nonfinite = False

    # -- settings ----------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict) -> dict:
        """``rule_options`` validated against ``options``: unknown keys and wrong types are refused."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            allowed = ", ".join(sorted(cls.options)) or "none"
            raise ValueError(f"rule {cls.name!r} does not take rule_options {unknown}; allowed: {allowed}")
        for key, value in options.items():
            default = cls.options[key]
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if numeric else isinstance(value, type(default))
            if not ok:
                raise ValueError(f"rule_options[{key!r}] for rule {cls.name!r} must be like {default!r}; got {value!r}")
        return dict(options)

    # -- start -------------------------------------------------------------------------------
    def init_factors(self, W: Tensor, r: int, generator: torch.Generator) -> Optional[tuple[Tensor, Tensor]]:
        """The layer's initial (P, Q) from its weight; ``None`` for a rule without factors."""
        return random_factors(W, r, generator)

    def attach(self, layers: list) -> None:
        """Called once the layers exist, before any forward (and again after a resume's load)."""
        if self.trains:
            self.optimizer = self.make_optimizer([t for layer in layers for t in (layer.P, layer.Q) if t is not None])

    def make_optimizer(self, factors: list[Tensor]) -> torch.optim.Optimizer:
        config = self.config
        lr = self.lr if config.feedback_lr is None else config.feedback_lr
        wd = self.weight_decay if config.feedback_weight_decay is None else config.feedback_weight_decay
        try:  # the fused kernel is several times faster for many small tensors (CPU and GPU)
            return torch.optim.AdamW(factors, lr=lr, weight_decay=wd, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return torch.optim.AdamW(factors, lr=lr, weight_decay=wd, foreach=True)

    # -- backward ----------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Before the forward of optimizer step ``step`` (0-based); a function of the count only,
        so a resumed run behaves like an uninterrupted one."""

    def collects(self, layer) -> bool:
        """Whether this step's backward gathers statistics for ``layer``."""
        return bool(self.stat_shapes(layer))

    def stat_shapes(self, layer) -> dict[str, tuple]:
        """Shapes of what ``statistics`` returns this step (for padding before an all-reduce)."""
        return {}

    def statistics(self, layer, g: Tensor, z: Optional[Tensor], x: Optional[Tensor]) -> dict[str, Tensor]:
        """This micro-batch's statistics (summed over micro-batches and processes before ``update``)."""
        return {}

    def input_grad(self, layer, g: Tensor, x: Optional[Tensor], x_shape, need_gx: bool, collect: bool) -> Optional[Tensor]:
        """The gradient for the layer's input, ``(δ P) Q`` (``None`` if not needed); statistics if ``collect``."""
        kind = layer.kind
        z = kind.down(g, layer.P) if need_gx or collect else None
        gx = kind.up(z, layer.Q, x_shape) if need_gx else None
        if collect:
            layer.accumulate(self.statistics(layer, g, z, x), kind.samples(g))
        return gx

    # -- learning ----------------------------------------------------------------------------
    def update(self, layers: list, step: int, refreshing: bool = False) -> None:
        """Learn from this step's statistics (``step`` is 1-based, after the optimizer step).
        ``refreshing``: the factors are re-initialised right after, so learning is wasted."""
        if self.trains and not refreshing and step % self.interval() == 0:
            layers = [layer for layer in layers if self.learns(layer)]
            if layers:
                self.apply_gradients(layers, self.gradients(layers))

    def learns(self, layer) -> bool:
        """Whether ``layer`` takes part in this step's update (e.g. it saw data since the last one)."""
        return layer.samples > 0 if self.stat_shapes(layer) else True

    def interval(self) -> int:
        """Optimizer steps between two updates of the factors."""
        return 1

    def gradients(self, layers: list) -> list[tuple[Tensor, Tensor]]:
        """(∇P, ∇Q) for every layer, in order (same-shaped layers may be batched)."""
        raise NotImplementedError(f"rule {self.name!r} trains its factors but defines no gradients()")

    def apply_gradients(self, layers: list, grads: list[tuple[Tensor, Tensor]]) -> None:
        """One AdamW step; a layer with a non-finite gradient is skipped (and counted)."""
        flat = [g for pair in grads for g in pair]
        # one fused finiteness check (a non-finite entry makes the norm non-finite), one sync
        finite = torch.stack(torch._foreach_norm(flat)).isfinite().view(-1, 2).all(1).tolist()
        kept = []
        for layer, pair, ok in zip(layers, grads, finite):
            if not ok:
                self.skip(layer)
                continue
            layer.P.grad, layer.Q.grad = pair
            kept += pair
        if not kept:
            return
        if self.grad_clip is not None:
            torch._foreach_clamp_min_(kept, -self.grad_clip)
            torch._foreach_clamp_max_(kept, self.grad_clip)
        self._move_optimizer_state()
        self.optimizer.step()
        for layer in layers:
            layer.P.grad = layer.Q.grad = None

    def set_factors(self, layer, P: Tensor, Q: Tensor) -> bool:
        """Write new factors into ``layer``; non-finite ones are skipped (and counted)."""
        if not (bool(torch.isfinite(P).all()) and bool(torch.isfinite(Q).all())):
            self.skip(layer)
            return False
        layer.P.data.copy_(P)
        layer.Q.data.copy_(Q)
        return True

    def forget(self, layer) -> None:
        """Drop what the optimizer learnt about ``layer``'s factors (after they were re-made)."""
        if self.optimizer is not None:
            self.optimizer.state.pop(layer.P, None)
            self.optimizer.state.pop(layer.Q, None)

    def skip(self, layer) -> None:
        """Count a skipped update; warn the first time only."""
        layer.skipped += 1
        if not self._warned_nonfinite:
            warnings.warn(
                f"LDFA: non-finite feedback statistics in {layer.name!r}; its update was skipped "
                "(counted in plugin.stats()['skipped_updates'], warned once)",
                LDFAWarning, stacklevel=5,
            )
            self._warned_nonfinite = True

    def _move_optimizer_state(self) -> None:
        """Optimizer state follows factors that followed their module to another device."""
        for factor, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.device != factor.device and value.dim() > 0:
                    state[key] = value.to(factor.device)

    def describe(self) -> str:
        """A few words on the rule's schedule for ``summary()`` (e.g. its exact steps); "" for none."""
        return ""

    # -- cost --------------------------------------------------------------------------------
    def work(self, layer: LayerCost, config) -> int:
        """Multiply-adds the rule itself spends per step on one layer (statistics and update)."""
        return 0

    def cost(self, layer: LayerCost, config) -> tuple[int, int]:
        """(backward multiply-adds per step, rule work included; the rule work alone) for one layer."""
        work = self.work(layer, config)
        return layer.feedback_backward + work, work

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, layers: list) -> dict[str, Tensor]:
        """The rule's own tensors for a checkpoint: the optimizer's state and each ``layer.state``."""
        state = {}
        for layer in layers:
            for key, factor in (("P", layer.P), ("Q", layer.Q)):
                opt_state = self.optimizer.state.get(factor, {}) if self.optimizer is not None else {}
                for item, value in opt_state.items():
                    state[f"{layer.name}.{key}.{item}"] = torch.as_tensor(value).detach()
            for key in self.state_keys:
                if layer.state.get(key) is not None:
                    state[f"{layer.name}.{key}"] = layer.state[key].detach()
        return state

    def unexpected_state(self, layers: list, keys: set) -> list[str]:
        """The keys of ``keys`` (what is left of a state dict after the factors) this rule would not load."""
        names = {layer.name for layer in layers}
        ok = set()
        for key in keys:
            head, _, item = key.rpartition(".")
            owner, _, factor = head.rpartition(".")
            if self.optimizer is not None and factor in ("P", "Q") and owner in names:
                ok.add(key)
            elif head in names and item in self.state_keys:
                ok.add(key)
        return sorted(keys - ok)

    def load_state_dict(self, layers: list, state: dict[str, Tensor]) -> None:
        """Restore ``state_dict`` output (already checked by ``unexpected_state``)."""
        for layer in layers:
            for key, factor in (("P", layer.P), ("Q", layer.Q)):
                if self.optimizer is None:
                    continue
                prefix = f"{layer.name}.{key}."
                restored = {k[len(prefix):]: v.to(factor.device) for k, v in state.items() if k.startswith(prefix)}
                if restored:
                    self.optimizer.state[factor] = restored
                else:
                    self.optimizer.state.pop(factor, None)
            for key in self.state_keys:
                value = state.get(f"{layer.name}.{key}")
                layer.state.pop(key, None)
                if value is not None:
                    layer.state[key] = value.detach().clone().to(layer.P.device)
