"""`LDFAPlugin`: attaches LDFA to a model, owns the factors, and steps the rule.

Data flows one way: backward hook → per-layer statistics → ``step()`` → the rule
turns statistics (or W) into gradients for P and Q → AdamW updates them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import allocation, diagnostics, distributed
from .branch_hook import REFIT_EVERY, BranchHook, fit_bridge, gain, pool
from .branches import find_branches
from .config import AUTO_REFRESH_FALLBACK, LDFAConfig, LDFAWarning
from .feedback import FeedbackHook, Switch
from .linalg import factor_generator
from .rules import make_rule
from .targets import (Target, classifier_head, existing_hook_owner, find_targets, sequence_classifier,
                      unmatched_rank_patterns)
from .zero_rows import ZeroRowSkipping, language_model_of, output_layer

STATE_NAME = "ldfa_state.safetensors"
_STEP_KEY = "__ldfa__.num_steps"
_SKIPPED_KEY = "__ldfa__.skipped"
_BRANCH_PREFIX = "__branch__."


class LayerView(NamedTuple):
    """One targeted layer as seen from outside the plugin (tensors are detached: read, don't write)."""

    name: str
    kind: str
    shape: tuple            # W as (m, n)
    rank: int
    module: nn.Module
    P: Optional[Tensor]     # m × r (a rule without factors may keep its own matrix here)
    Q: Optional[Tensor]     # r × n
    skipped: int            # updates skipped for non-finite statistics
    forward_samples: int    # samples in the layer's last training forward
    statistics: Mapping[str, Tensor]  # what the backward gathered since the last step()
    pending_samples: float  # samples behind ``statistics``
    input_grad: bool        # whether its input needed a gradient in its last training forward
    weight: Callable[[], Tensor]  # W as m × n (refuses a weight sharded away outside forward)


class BranchView(NamedTuple):
    """One residual branch as seen from outside the plugin (``skip_branches``)."""

    name: str
    role: str               # "attention", "mlp", or a branch_map role
    depth: int              # block index, 0 at the bottom
    mode: str               # this step's: "exact", "skip" or "bridge"
    rate: float             # its probability of skipping a step
    gain: float             # measured ‖J_bᵀ δ‖ / ‖δ‖ (NaN before it ran exact)
    exact_backwards: int    # backwards it ran since attach
    P: Optional[Tensor]     # the bridge, d × r (None without one, or before its first fit)
    Q: Optional[Tensor]


class LDFAPlugin:
    """LDFA on one model: hooks on the targeted layers and their feedback factors.

    Example:
        >>> import torch, ldfa_hf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=2))
        >>> model(torch.randn(5, 8)).sum().backward()
        >>> plugin.step()          # after optimizer.step()
        >>> plugin.detach()        # exact backprop again
    """

    def __init__(self, config: Optional[LDFAConfig] = None) -> None:
        if config is None:
            config = LDFAConfig()
        if not isinstance(config, LDFAConfig):
            raise TypeError(
                f"config must be an LDFAConfig, got {type(config).__name__} "
                "(build one with LDFAConfig(**values) or LDFAConfig.from_dict(values))"
            )
        self.config = config
        self.rule = make_rule(config)
        self.switch = Switch()
        self.num_steps = 0
        self.steps_per_epoch: Optional[int] = None  # optimizer steps per epoch, if known ("auto" refresh)
        self._hooks: dict[str, FeedbackHook] = {}  # one record per targeted layer, in module order
        self._head: Optional[ZeroRowSkipping] = None  # the exact LM head, over the scored rows only
        self._branches: dict[str, BranchHook] = {}  # residual branches (skip_branches > 0), bottom first
        self._pooled: dict[str, dict] = {}  # per branch: decayed sums of its exact steps' statistics
        self._rates: Optional[Tensor] = None
        self._model: Optional[nn.Module] = None
        self._synced = False
        self._pending = False  # factors wait for real weights (model wrapped on the meta device)
        self._warned_eval = False

    # -- attach / detach ---------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "LDFAPlugin":
        """Hook every targeted layer of ``model``. Every check runs before the model is touched."""
        if self._hooks:
            raise ValueError("this LDFAPlugin is already attached to a model; call detach() first")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        owner = existing_hook_owner(model)
        if owner is not None:
            raise ValueError(
                f"{type(model).__name__} is already wrapped with LDFA (module {owner!r} carries an LDFA hook); "
                "call detach() on the existing plugin first"
            )
        _check_classifier(model)
        found = find_targets(model, self.config)
        missing = unmatched_rank_patterns(found, self.config)
        if missing:
            warnings.warn(f"LDFA rank_pattern keys {missing} match no targeted layer", LDFAWarning, stacklevel=3)

        clip = self.rule.error_clip if self.config.error_clip == "auto" else self.config.error_clip
        hooks = {
            name: FeedbackHook(name=name, kind=kind(module), target=target, rule=self.rule,
                               switch=self.switch, error_clip=clip)
            for name, (module, kind, target) in found.items()
        }
        # initial factors, still before any hook is registered; weights on the meta device (a model
        # built before loading or sharding) defer them to materialize()
        self._pending = self.rule.has_factors and any(hook.module.weight.is_meta for hook in hooks.values())
        if self.rule.has_factors and not self._pending:
            self._init_factors(hooks)
        head = self._exact_head(model, hooks)
        branches = self._find_branches(model)
        registered = []
        try:
            for hook in [*hooks.values(), *([head] if head else []), *branches.values()]:
                registered.append(hook.register())
        except BaseException:
            for hook in registered:
                hook.remove()
            raise

        self._hooks, self._head = hooks, head
        self._branches, self._pooled = branches, {name: {} for name in branches}
        self._model = model
        if not self._pending:
            self.rule.attach(list(hooks.values()))
        self._synced = False
        self.switch.materialize = self.materialize
        if not self._pending:
            self._sync_once()
        self._schedule()
        compiled_code_sees_hooks()
        return self

    def _exact_head(self, model: nn.Module, hooks: Mapping[str, FeedbackHook]) -> Optional[ZeroRowSkipping]:
        """The LM head, if LDFA leaves it exact and ``skip_zero_rows`` is on (``zero_rows.py``), with the
        language model whose labels say which of its rows the loss reads."""
        head = output_layer(model) if self.config.skip_zero_rows else None
        if head is None or any(hook.module is head for hook in hooks.values()):
            return None
        name = next((n for n, m in model.named_modules() if m is head), None)
        return None if name is None else ZeroRowSkipping(name, head, self.switch, language_model_of(model, head))

    def _find_branches(self, model: nn.Module) -> dict[str, BranchHook]:
        """The residual branches whose backward may be skipped (``skip_branches``), or none."""
        if self.config.skip_branches <= 0:
            return {}
        measure = self.config.branch_allocation == "sensitivity" or self.config.branch_bridge > 0
        return {branch.name: BranchHook(branch, self.switch, bridge_rank=self.config.branch_bridge or None,
                                        tail=self.config.branch_tail, measure=measure)
                for branch in find_branches(model, self.config.branch_map)}

    def _init_factors(self, hooks: Mapping[str, FeedbackHook]) -> None:
        """Every layer's initial P, Q from its weight (seeded by name: the same on every process)."""
        for name, hook in hooks.items():
            W = hook.weight_matrix()  # refuses FSDP / ZeRO-3 shards with a clear error
            if not torch.isfinite(W).all():
                raise ValueError(f"weight of {name!r} contains NaN or Inf; cannot initialise its feedback")
        for name, hook in hooks.items():
            P, Q = self.rule.init_factors(hook.weight_matrix(), hook.rank, factor_generator(self.config.seed, name, 0))
            hook.P, hook.Q = P.float().contiguous(), Q.float().contiguous()

    @property
    def materialized(self) -> bool:
        """Whether the feedback factors exist (False while the weights were on the meta device)."""
        return not self._pending

    def materialize(self) -> "LDFAPlugin":
        """Make the feedback factors from the now-real weights of a model wrapped on the meta device.

        Happens by itself at the first training forward; call it after loading the weights to have
        the factors (and ``stats()``, ``state_dict()``) earlier. The factors equal those of wrapping
        the loaded model directly.

        Example:
            >>> with torch.device("meta"):
            ...     model = AutoModelForCausalLM.from_config(config)
            >>> plugin = ldfa_hf.wrap(model, LDFAConfig(rank=32))
            >>> model.to_empty(device="cpu"); model.load_state_dict(weights)
            >>> plugin.materialize()
        """
        if not self._pending:
            return self
        still_meta = [name for name, hook in self._hooks.items() if hook.module.weight.is_meta]
        if still_meta:
            raise ValueError(
                f"LDFA cannot make feedback factors yet: {len(still_meta)} targeted weights are still on the "
                f"meta device ({', '.join(still_meta[:3])}{' ...' if len(still_meta) > 3 else ''}); "
                "load real weights first (e.g. model.to_empty(device=...) then load_state_dict)"
            )
        self._init_factors(self._hooks)
        self._pending = False
        self.rule.attach(list(self._hooks.values()))
        self._sync_once()
        return self

    def _require_factors(self, what: str) -> None:
        if self._pending:
            raise RuntimeError(
                f"{what} needs the feedback factors, which are made once the weights are real: at the first "
                "training forward, or by calling plugin.materialize() after loading the weights"
            )

    def detach(self) -> None:
        """Remove every hook: the model is exactly as it was before ``attach``."""
        for hook in [*self._hooks.values(), *([self._head] if self._head else []), *self._branches.values()]:
            hook.remove()
        self._hooks, self._head, self._model = {}, None, None
        self._branches, self._pooled, self._rates = {}, {}, None
        self.rule.optimizer = None
        compiled_code_sees_hooks()

    def _factors(self) -> list[Tensor]:
        return [t for hook in self._hooks.values() for t in (hook.P, hook.Q) if t is not None]

    def _stored_factors(self) -> Iterator[tuple[str, Tensor]]:
        """(state key, factor) for every factor kept in state (a rule without factors keeps none)."""
        if not self.rule.has_factors:
            return
        for name, hook in self._hooks.items():
            yield f"{name}.P", hook.P
            yield f"{name}.Q", hook.Q

    def _sync_once(self) -> None:
        """Rank 0's factors everywhere, once torch.distributed is up."""
        if not self._synced and distributed.world_size() > 1:
            distributed.broadcast_(self._factors())
            self._synced = True

    # -- training ----------------------------------------------------------------------------
    def step(self) -> None:
        """Update P and Q from this step's statistics. Call once per optimizer step, after it."""
        if not self._hooks:
            raise RuntimeError("LDFAPlugin.step() called on a detached plugin; call attach(model) first")
        self._require_factors("LDFAPlugin.step()")
        self._sync_once()
        layers = list(self._hooks.values())
        self._warn_if_eval_mode(layers)
        self._average_statistics(layers)
        self.num_steps += 1
        interval = self.refresh_interval
        refresh = self.rule.refreshes and interval is not None and self.num_steps % interval == 0
        self.rule.update(layers, self.num_steps, refreshing=refresh)
        self._update_branches()
        self.reset_statistics()
        for hook in layers:
            hook.backward_seen = False
        if refresh:
            self.refresh()
        self._schedule()

    def _warn_if_eval_mode(self, layers: list[FeedbackHook]) -> None:
        """Statistics are gathered in training mode only; a step whose forward ran in eval mode
        (``from_pretrained`` returns eval mode) would leave a rule that needs them learning nothing."""
        if self._warned_eval or not any(self.rule.stat_shapes(h) for h in layers):
            return
        if all(h.eval_forward for h in layers) and not any(h.backward_seen for h in layers):
            warnings.warn(
                f"LDFA: the model's forward ran in eval mode, where LDFA gathers no statistics, so rule "
                f"{self.config.rule!r} learnt nothing this step; call model.train() before training "
                "(from_pretrained returns a model in eval mode; the Trainer calls train() itself)",
                LDFAWarning, stacklevel=3)
            self._warned_eval = True

    def _schedule(self) -> None:
        """Tell the rule which step comes next (a function of the step count only, so a resumed
        run behaves on every step as an uninterrupted one)."""
        self.rule.begin_step(self.num_steps)
        self._draw_branches()

    # -- residual branches (skip_branches) ---------------------------------------------------------
    def _update_branches(self) -> None:
        """Fold the exact branches' statistics into their pooled ones; refit a few bridges."""
        if not self._branches:
            return
        self._average_branch_statistics()
        for index, (name, hook) in enumerate(self._branches.items()):
            fresh = pool(hook, self._pooled[name])
            if fresh:
                self._pooled[name]["fresh"] = torch.ones(())
            due = (self.num_steps + index) % REFIT_EVERY == 0 or hook.P is None
            if hook.bridge_rank and due and self._pooled[name].pop("fresh", None) is not None:
                fitted = fit_bridge(self._pooled[name], hook.bridge_rank)
                if fitted is not None and all(torch.isfinite(t).all() for t in fitted):
                    hook.P, hook.Q = fitted

    def branch_rates(self) -> Tensor:
        """Each branch's probability of skipping the next step, bottom branch first."""
        hooks = list(self._branches.values())
        mean, how = self.config.skip_branches, self.config.branch_allocation
        if how == "uniform":
            return allocation.uniform_rates(len(hooks), mean)
        if how == "bottom":
            return allocation.bottom_rates(len(hooks), mean)
        if how == "cut":
            return allocation.cut_rates(*self.cut_bounds(), len(hooks))
        if how == "depth":
            return allocation.depth_rates(torch.tensor([h.depth for h in hooks]), mean)
        gains = torch.tensor([gain(self._pooled[h.name]) for h in hooks], dtype=torch.float64)
        return allocation.sensitivity_rates(gains, mean)  # a branch not measured yet runs exact

    def cut_bounds(self) -> tuple[int, int]:
        """``branch_allocation="cut"``: how many of the bottom branches a step may skip, fewest and most."""
        return allocation.cut_bounds(len(self._branches), self.config.skip_branches)

    def _draw_branches(self) -> None:
        """This step's mode of every branch: a function of the seed, the step and the pooled
        statistics (all in the state), so equal on every process and after a resume."""
        if not self._branches:
            return
        self._rates = self.branch_rates()
        if self.config.branch_allocation == "cut":
            skip = allocation.draw_cut(*self.cut_bounds(), len(self._branches), self.config.seed, self.num_steps)
        else:
            skip = allocation.draw(self._rates, self.config.seed, self.num_steps, independent=self.config.branch_unbiased)
        unbiased = self.config.branch_unbiased
        for hook, skipped, rate in zip(self._branches.values(), skip.tolist(), self._rates.tolist()):
            hook.mode = "exact" if not skipped else ("bridge" if hook.P is not None else "skip")
            hook.scale = 1.0 / (1.0 - rate) if unbiased and not skipped else 1.0

    def _average_branch_statistics(self) -> None:
        if distributed.world_size() == 1:
            return
        flat = []
        for hook in self._branches.values():
            if hook.mode != "exact" or not hook.measure:
                continue
            for key in ("out2", "in2"):  # every process ran the same modes, so has the same keys
                hook.stats.setdefault(key, torch.zeros(()))
            flat += [hook.stats[key] for key in ("out2", "in2", "oo", "oi") if key in hook.stats]
        if flat:
            distributed.average_(flat)

    @property
    def branches(self) -> Mapping[str, BranchView]:
        """Residual branch name → a read-only view (role, depth, this step's mode, rate, gain, bridge).

        Example:
            >>> plugin = ldfa_hf.wrap(model, LDFAConfig.for_finetuning(skip_branches=0.5))
            >>> {name: b.mode for name, b in plugin.branches.items()}
        """
        rates = self._rates.tolist() if self._rates is not None else [0.0] * len(self._branches)
        return MappingProxyType({
            name: BranchView(name, hook.role, hook.depth, hook.mode, rate, gain(self._pooled[name]),
                             hook.backward_runs, None if hook.P is None else hook.P.detach(),
                             None if hook.Q is None else hook.Q.detach())
            for (name, hook), rate in zip(self._branches.items(), rates)
        })

    def reset_statistics(self) -> None:
        """Drop what the backward hooks gathered since the last step (e.g. after a skipped step)."""
        for hook in [*self._hooks.values(), *self._branches.values()]:
            hook.clear_stats()

    def _average_statistics(self, hooks: list[FeedbackHook]) -> None:
        """Same statistics on every process: pad absent ones with zeros, then one all-reduce."""
        if distributed.world_size() == 1:
            return
        shapes = [self.rule.stat_shapes(hook) for hook in hooks]
        if not any(shapes):
            return
        flat, counts = [], []
        for hook, hook_shapes in zip(hooks, shapes):
            device = hook.module.weight.device if hook.P is None else hook.P.device
            for key, shape in hook_shapes.items():
                if key not in hook.stats:
                    hook.stats[key] = torch.zeros(shape, device=device)
                flat.append(hook.stats[key])
            counts.append(torch.tensor([float(hook.samples)], device=device))
        distributed.average_(flat + counts)
        for hook, count in zip(hooks, counts):
            hook.samples = float(count)

    def refresh(self) -> None:
        """Re-initialise P, Q from the current weights (seeded: identical on every process)."""
        for name, hook in self._hooks.items():
            if hook.P is None:
                continue
            W = hook.weight_matrix()
            if not torch.isfinite(W).all():
                self.rule.skip(hook)
                continue
            P, Q = self.rule.init_factors(W, hook.rank, factor_generator(self.config.seed, name, self.num_steps))
            hook.P.data.copy_(P)
            hook.Q.data.copy_(Q)
            self.rule.forget(hook)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Exact backprop inside the block; LDFA again after it."""
        previous = self.switch.enabled
        self.switch.enabled = False
        try:
            yield
        finally:
            self.switch.enabled = previous

    @property
    def refresh_interval(self) -> Optional[int]:
        """Steps between SVD refreshes: ``refresh_every``, with ``"auto"`` resolved to half an epoch
        when ``steps_per_epoch`` is known (the Trainer callback sets it), else 500."""
        every = self.config.refresh_every
        if every != "auto":
            return every
        if self.steps_per_epoch:
            return max(1, self.steps_per_epoch // 2)
        return AUTO_REFRESH_FALLBACK

    # -- introspection ---------------------------------------------------------------------------
    @property
    def targets(self) -> dict[str, Target]:
        """Targeted layer name → ``Target(kind, shape=(m, n), rank)``."""
        return {name: hook.target for name, hook in self._hooks.items()}

    @property
    def layers(self) -> Mapping[str, "LayerView"]:
        """Targeted layer name → a read-only view of it (kind, shape, rank, P, Q, skipped updates).

        Example:
            >>> view = plugin.layers["bert.encoder.layer.0.attention.self.query"]
            >>> view.rank, view.P.shape
        """
        return MappingProxyType({
            name: LayerView(name, hook.target.kind, hook.target.shape, hook.rank, hook.module,
                            None if hook.P is None else hook.P.detach(),
                            None if hook.Q is None else hook.Q.detach(),
                            hook.skipped, hook.last_samples,
                            MappingProxyType({k: v.detach() for k, v in hook.stats.items()}), hook.samples,
                            hook.input_needs_grad, hook.weight_matrix)
            for name, hook in self._hooks.items()
        })

    @property
    def model(self) -> Optional[nn.Module]:
        return self._model

    def cost(self, samples: Optional[int] = None) -> dict:
        """Estimated multiply-adds per training step in the targeted layers, backprop vs LDFA
        (``diagnostics.estimate_cost``): forward, backward_bp, backward_ldfa, rule, backward_saved,
        step_saved, and whether the rows per step were assumed. ``samples``: rows (tokens) per
        layer and step; by default those of the last training forward."""
        return diagnostics.estimate_cost(self, samples)

    def summary(self, print_fn: Optional[Callable[[str], Any]] = print,
                samples: Optional[int] = None) -> Optional[str]:
        """What runs exactly and what gets feedback (by block), one line per group of same-role,
        same-shape LDFA layers, the feedback parameters, and the estimated saving of the whole
        model's linear layers at ``samples`` rows (tokens) per step (by default those of the last
        training forward; assumed, and said so, before the first one). Printed with ``print_fn``
        (then nothing is returned, so a REPL shows it once), or returned with ``print_fn=None``.

        Example:
            >>> plugin.summary(samples=8 * 128)   # 8 sequences of 128 tokens per step
            >>> text = plugin.summary(print_fn=None)
        """
        text = diagnostics.summary_text(self, samples)
        if print_fn is None:
            return text
        print_fn(text)
        return None

    def stats(self, batch: Any = None, loss_fn: Optional[Callable[[Any], Tensor]] = None) -> dict:
        """Per-layer diagnostics: relative feedback error ‖PQ − W‖/‖W‖, skipped updates and,
        when ``batch`` is given, the angle (degrees) between LDFA's and backprop's gradient
        at each layer's input. ``batch`` is passed to the model (``model(**batch)`` for a
        mapping); the loss is ``loss_fn(output)`` or ``output.loss``.
        """
        self._require_factors("LDFAPlugin.stats()")
        return diagnostics.layer_stats(self, batch, loss_fn)

    @contextlib.contextmanager
    def statistics_paused(self) -> Iterator[None]:
        """LDFA feedback as usual, but the backward gathers nothing for the rule (diagnostic passes)."""
        previous = self.switch.collecting
        self.switch.collecting = False
        try:
            yield
        finally:
            self.switch.collecting = previous

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Factors, the rule's own state (its optimizer's included) and the step counter, as a flat dict of tensors."""
        self._require_factors("LDFAPlugin.state_dict()")
        state = {_STEP_KEY: torch.tensor(self.num_steps, dtype=torch.int64),
                 _SKIPPED_KEY: torch.tensor([hook.skipped for hook in self._hooks.values()], dtype=torch.int64)}
        for key, factor in self._stored_factors():
            state[key] = factor.detach()
        state.update(self.rule.state_dict(list(self._hooks.values())))
        for name, hook in self._branches.items():
            pooled = dict(self._pooled[name])
            if hook.P is not None:
                pooled.update(P=hook.P, Q=hook.Q)
            for key, value in pooled.items():
                state[f"{_BRANCH_PREFIX}{name}.{key}"] = value.detach()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore ``state_dict()`` output. Every key and shape is checked before anything changes."""
        if not self._hooks:
            raise RuntimeError("load_state_dict needs an attached plugin")
        self._require_factors("LDFAPlugin.load_state_dict()")
        layers = list(self._hooks.values())
        expected = {_STEP_KEY, _SKIPPED_KEY}
        for key, factor in self._stored_factors():
            expected.add(key)
            if key in state and tuple(state[key].shape) != tuple(factor.shape):
                raise ValueError(
                    f"LDFA state {key} has shape {tuple(state[key].shape)}, "
                    f"this model needs {tuple(factor.shape)} (different rank or model?)"
                )
        branch_keys = {k for k in state if k.startswith(_BRANCH_PREFIX)}
        branch_state = self._branch_state(state, branch_keys)
        missing = sorted(expected - set(state))
        unexpected = self.rule.unexpected_state(layers, set(state) - expected - branch_keys)
        if missing or unexpected:
            raise ValueError(
                f"LDFA state does not match this model's targets: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        if state[_SKIPPED_KEY].numel() != len(self._hooks):
            raise ValueError("LDFA state has skipped-update counters for a different number of layers")
        self.num_steps = int(state[_STEP_KEY])
        for name, hook in self._branches.items():
            values = branch_state.get(name, {})
            hook.P, hook.Q = values.pop("P", None), values.pop("Q", None)
            self._pooled[name] = values
        self._schedule()
        for hook, skipped in zip(layers, state[_SKIPPED_KEY].tolist()):
            hook.skipped = int(skipped)
        for key, factor in self._stored_factors():
            factor.data.copy_(state[key])
        self.rule.load_state_dict(layers, {k: v for k, v in state.items() if k not in expected})
        self.reset_statistics()

    def _branch_state(self, state: Mapping[str, Tensor], keys: set) -> dict[str, dict]:
        """The branch entries of a state dict, by branch; a branch this plugin lacks is refused."""
        out: dict[str, dict] = {}
        for key in keys:
            name, _, field = key[len(_BRANCH_PREFIX):].rpartition(".")
            if name not in self._branches or field not in ("out2", "in2", "oo", "oi", "fresh", "P", "Q"):
                raise ValueError(f"LDFA state has {key!r}, but this plugin has no such residual branch statistic "
                                 f"(skip_branches={self.config.skip_branches}, {len(self._branches)} branches)")
            out.setdefault(name, {})[field] = state[key].detach().clone()
        return out

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``ldfa_config.json`` and ``ldfa_state.safetensors`` into ``save_directory``."""
        from safetensors.torch import save_file

        self.config.save_pretrained(save_directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(save_directory, STATE_NAME), metadata={"format": "pt", "rule": self.config.rule})

    def load_pretrained(self, directory: Union[str, os.PathLike]) -> "LDFAPlugin":
        """Load the state ``save_pretrained`` wrote in ``directory`` into this attached plugin.

        Every key and shape is checked first; a missing, corrupt or mismatched file is named in
        the error and nothing changes.

        Example:
            >>> plugin = ldfa_hf.wrap(model, LDFAConfig.from_pretrained("ckpt"))
            >>> plugin.load_pretrained("ckpt")
        """
        path = os.path.join(directory, STATE_NAME)
        state = load_state_file(path)
        try:
            self.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path}: {err}") from None
        return self

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], model: nn.Module) -> "LDFAPlugin":
        """Wrap ``model`` with the config and state saved in ``directory``.

        A missing or unreadable file names itself; on any failure the model is left unwrapped.
        """
        config = LDFAConfig.from_pretrained(directory)
        load_state_file(os.path.join(directory, STATE_NAME))  # a missing or corrupt file fails before wrapping
        plugin = cls(config).attach(model)
        try:
            plugin.load_pretrained(directory)
        except BaseException:
            plugin.detach()
            raise
        return plugin

    def __repr__(self) -> str:
        where = f"{len(self._hooks)} layers" if self._hooks else "detached"
        return f"LDFAPlugin(rule={self.config.rule!r}, rank={self.config.rank}, {where}, step={self.num_steps})"


def _check_classifier(model: nn.Module) -> None:
    """A sequence classifier (a reward model too) scores each row at its last non-pad token, which
    it finds through ``config.pad_token_id``: without one it fails on the first batch of two rows.
    Said before anything is attached, with the fix."""
    found = sequence_classifier(model)
    if found is None:
        return
    classifier = found[1]
    config = classifier.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "pad_token_id", None) is None:
        raise ValueError(
            f"{type(classifier).__name__} has no pad_token_id, so it cannot find each row's last token in a padded "
            "batch; set model.config.pad_token_id = tokenizer.pad_token_id (tokenizer.pad_token = "
            "tokenizer.eos_token if it has none) before wrapping")
    classifier_head(model)  # raises when the head is not found


def compiled_code_sees_hooks() -> None:
    """Make ``torch.compile`` notice LDFA's hooks being added or removed.

    TorchDynamo does not guard on module hooks by default (``skip_nnmodule_hook_guards``), so
    a model compiled before ``attach`` (or another model of the same structure compiled in
    the process) would keep running its hook-free graph: exact backprop, silently. From the
    first ``attach`` on, hooks are guarded; graphs compiled before it are dropped once.
    """
    try:
        import torch._dynamo as dynamo
    except ImportError:  # pragma: no cover
        return
    config = dynamo.config
    if getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False
        dynamo.reset()  # graphs guarded without hooks cannot see ours


def load_state_file(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Read a plugin state file; missing or corrupt files are named in the error."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LDFA state file not found: {path}")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"LDFA state file {path} is corrupt or not a safetensors file: {err}") from None


def wrap(model: nn.Module, config: Optional[LDFAConfig] = None) -> LDFAPlugin:
    """Attach LDFA to ``model`` in place and return the plugin.

    Example:
        >>> plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=16))
        >>> loss.backward(); optimizer.step(); plugin.step()
    """
    return LDFAPlugin(config).attach(model)
