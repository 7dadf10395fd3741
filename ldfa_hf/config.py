"""`LDFAConfig`: what to target, at which rank, and how the feedback is learned.

Validated on construction so that a bad value fails before any model is touched,
and JSON round-trippable so a run's feedback settings travel with its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

from . import rules
from .warning import LDFAWarning

CONFIG_NAME = "ldfa_config.json"
AUTO_REFRESH_FALLBACK = 500  # refresh_every="auto" when the epoch length is unknown
# the built-in rule names, for type checkers (a test keeps them equal to ``rules.BUILTIN``);
# any name given to ``register_rule`` is accepted too
RuleName = Literal["svd", "local", "oja", "calibrated", "streaming", "sampled", "fixed", "fa", "dfa", "bp"]
BranchAllocation = Literal["sensitivity", "depth", "uniform", "bottom", "cut"]  # LDFAConfig.branch_allocation
# LDFAConfig fields only some rules read (``Rule.settings``): setting one the rule ignores warns
RULE_SETTINGS = ("refit_every", "calibrate_every", "feedback_lr", "feedback_weight_decay")


# LDFAConfig.for_finetuning() (v0.4.0): chosen on SmolLM2-135M LoRA, arithmetic SFT over 4 seeds (RESULTS.md h):
# the bottom third of the residual branches skips its backward on every step while their output projections
# still learn, the top two thirds exact: -1.0 +- 3.2 points and +4% held-out loss against plain LoRA at 1.34x a
# step (with the exact head's scored-rows forward), where the bottom half (v0.3.0's default) lost 5.2 +- 5.5
# points and 15% at 1.44x and reached plain LoRA's final loss sooner on no seed. Two thirds lost 30 points;
# no low-rank feedback measured so far beats skipping outright: the rule is "bp" (the skipped third's linears
# run no backward, the exact top none of LDFA's hooks).
FINETUNING: dict = {"rule": "bp", "exact_top": 2 / 3, "skip_branches": 1 / 3, "branch_allocation": "bottom",
                    "branch_tail": True}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pattern(name: str, value: Any, allow_none: bool) -> None:
    """A target spec is a regex string or a non-empty list of name strings."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if value == "all-linear":
            return
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from None
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ValueError(
        f"{name} must be 'all-linear', a regex string or a non-empty list of module names; got {value!r}"
    )


def _check_rate(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (or None for the rule's default); got {value!r}")


def _check_branch_map(value: Any) -> None:
    if value is None:
        return
    example = ("{'blocks': r'layers\\.\\d+', 'branches': {'attention': ['input_layernorm', 'self_attn', "
               "'self_attn.o_proj'], 'mlp': ['post_attention_layernorm', 'mlp', 'mlp.down_proj']}}")
    if not isinstance(value, dict) or set(value) != {"blocks", "branches"} or not isinstance(value["blocks"], str) \
            or not isinstance(value["branches"], dict) or not value["branches"]:
        raise ValueError(f"branch_map must look like {example}; got {value!r}")
    try:
        re.compile(value["blocks"])
    except re.error as err:
        raise ValueError(f"branch_map['blocks']={value['blocks']!r} is not a valid regular expression: {err}") from None
    for role, ends in value["branches"].items():
        if not isinstance(role, str) or not isinstance(ends, (list, tuple)) or len(ends) not in (2, 3) \
                or not all(isinstance(e, str) and e for e in ends):
            raise ValueError(f"branch_map['branches'][{role!r}] must be [input module, output module] or "
                             f"[input, output, output projection] (names inside the block); got {ends!r}")


@dataclass
class LDFAConfig:
    r"""Settings for Low-Dimensional Feedback Alignment.

    Args:
        rank: feedback rank r; each layer uses ``min(rank, m, n)``.
        rank_pattern: per-module rank overrides, ``{name or suffix or regex: rank}``
            (e.g. ``{"qkv": 96}`` for a fused projection).
        rule: how P and Q are learned: ``"svd"`` (default), ``"local"``, ``"oja"``,
            ``"calibrated"`` (for fine-tuning pretrained models), ``"streaming"``, ``"sampled"`` (unbiased:
            low-rank feedback plus exact rows; ``for_finetuning()`` uses it), ``"fixed"``, ``"fa"``,
            ``"dfa"`` (Direct Feedback Alignment, a baseline) or
            ``"bp"`` (exact backprop through the same hooks).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` and GPT-2 ``Conv1D``,
            the output head included), a list of exact names or name suffixes, or
            a regex matched against the whole module name.
        exclude_modules: same forms as ``target_modules``; matches are left exact.
        exact_top: the fraction (0 ≤ f < 1) of the targeted layers nearest the output — the last
            in module order, so the top blocks and the head — left with exact backprop; LDFA
            feeds back below them (the authors' recipe for large models; docs/METHOD.md §3d).
        skip_zero_rows: when LDFA leaves the LM head exact (``exact_top``, ``exclude_modules``), it
            computes only the rows the loss scores (completion-only SFT, masked LM, padding): in a
            training forward whose ``labels`` go into a causal or masked LM (its own loss, as the
            ``Trainer`` runs it), only the scored tokens' logits (the others are returned as zeros,
            which that loss never reads); in a frozen head's backward, only its error's non-zero
            rows. Exact, and cheaper; ``False`` leaves the head to autograd.
        include_conv: with ``"all-linear"``, also target ``nn.Conv2d`` with ``groups == 1``.
        refresh_every: ``svd`` rule: re-run the truncated SVD every this many steps;
            ``"auto"`` (default) is half an epoch when the epoch length is known (from
            ``LDFACallback``, or ``plugin.steps_per_epoch = n``), else
            ``AUTO_REFRESH_FALLBACK`` (500) steps; ``None``: only at initialisation.
        refit_every: ``svd`` rule: ``None`` (default) descends ½‖PQ − W‖² with AdamW every
            step, as the paper does; an int k re-fits P Q to W by one alternating-least-squares
            sweep every k steps instead (docs/METHOD.md §2): the rule's work divided by k, at a
            measured accuracy cost on a from-scratch LM (benchmarks/results/RESULTS.md f).
        calibrate_every: ``calibrated`` rule: one optimizer step in this many (the first
            one included) runs exact backprop and re-aims P, Q at the gradients it sent down.
            4 is the measured default (docs/METHOD.md §3); larger saves more, less accurately.
        feedback_lr / feedback_weight_decay: AdamW settings for the factors;
            ``None`` takes the rule's published default.
        error_clip: clamp the propagated error to ``±error_clip``; ``"auto"``
            takes the rule's default (1.0 for ``oja``, none otherwise).
        seed: seeds factor initialisation and randomised SVDs (same on every process).
        skip_branches: the mean share (0 ≤ s < 1) of the residual branches (each block's attention and
            MLP, with their norms) whose backward is skipped each step, drawn afresh every step: the error
            goes down the residual path alone and the branch's adapters rest that step (docs/METHOD.md §3e).
            0 (default) skips nothing.
        branch_bridge: with ``skip_branches``, a skipped branch still sends its input a rank-r error
            ``(δ P) Q`` fitted from the steps it ran exact; 0 (default) sends nothing.
        branch_tail: a skipped branch's output projection (``o_proj``, ``down_proj``) still learns from
            the branch's output error: only its input side skips the backward (its adapters' gradient
            costs ``N·r·(m+n)``).
        branch_unbiased: a branch that runs exact sends its input ``1 / (1 − p_b)`` times its error, so
            that over the draws the error below it is backprop's (unbiased, with more variance); the
            branches then draw independently, so the number skipped varies from step to step.
        branch_allocation: how the per-branch rates are set: ``"sensitivity"`` (default; branches
            that add little error to the stream skip more), ``"depth"`` (falling linearly to 0 at the
            top block), ``"uniform"`` (DropBP's plain form) or ``"bottom"`` (the bottom ``skip_branches``
            share of the branches skips on every step: a fixed cut, whose learning tails still train) or
            ``"cut"`` (each step a random depth, below which every branch skips and above which every
            branch runs exact: the number skipped is uniform over the middle half of the widest
            range that averages ``skip_branches``).
        branch_map: where the branches are, for a model family ``ldfa_hf.branches.BRANCH_MAPPINGS``
            lacks: ``{"blocks": r"layers\.\d+", "branches": {"attention": ["input_layernorm",
            "self_attn", "self_attn.o_proj"], "mlp": ["post_attention_layernorm", "mlp", "mlp.down_proj"]}}``
            (each branch: the module whose input is the branch's input, the one whose output the block
            adds to the stream, and optionally its output projection; names inside the block).
        rule_options: settings of the chosen rule itself (``Rule.options``), checked by the rule,
            e.g. ``{"subspace": "output"}`` for ``calibrated``; saved with the plugin.

    Example:
        >>> cfg = LDFAConfig(rank=10, rule="svd", exclude_modules=["classifier"])
        >>> LDFAConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    rank: int = 16
    rank_pattern: dict = field(default_factory=dict)
    rule: RuleName = "svd"
    target_modules: Union[str, list] = "all-linear"
    exclude_modules: Optional[Union[str, list]] = None
    exact_top: float = 0.0
    skip_zero_rows: bool = True
    include_conv: bool = True
    refresh_every: Union[int, str, None] = "auto"
    refit_every: Optional[int] = None
    calibrate_every: int = 4
    feedback_lr: Optional[float] = None
    feedback_weight_decay: Optional[float] = None
    error_clip: Union[float, str, None] = "auto"
    seed: int = 0
    rule_options: dict = field(default_factory=dict)
    skip_branches: float = 0.0
    branch_bridge: int = 0
    branch_allocation: BranchAllocation = "sensitivity"
    branch_tail: bool = False
    branch_unbiased: bool = False
    branch_map: Optional[dict] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if not _is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int; got {self.rank!r}")
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a dict of {{module pattern: rank}}; got {self.rank_pattern!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"rank_pattern keys must be non-empty strings; got {key!r}")
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"rank_pattern key {key!r} is not a valid regular expression: {err}") from None
            if not _is_int(value) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive int; got {value!r}")
        rule = rules.rule_class(self.rule)  # unknown names list the known ones
        if not isinstance(self.rule_options, dict):
            raise ValueError(f"rule_options must be a dict of the rule's own settings; got {self.rule_options!r}")
        rule.check_options(self.rule_options)
        _check_pattern("target_modules", self.target_modules, allow_none=False)
        _check_pattern("exclude_modules", self.exclude_modules, allow_none=True)
        if isinstance(self.exact_top, bool) or not isinstance(self.exact_top, (int, float)) or not 0 <= self.exact_top < 1:
            raise ValueError(f"exact_top must be a fraction 0 <= f < 1 of the targeted layers; got {self.exact_top!r}")
        if not isinstance(self.skip_zero_rows, bool):
            raise ValueError(f"skip_zero_rows must be a bool; got {self.skip_zero_rows!r}")
        if not isinstance(self.include_conv, bool):
            raise ValueError(f"include_conv must be a bool; got {self.include_conv!r}")
        if self.refresh_every not in (None, "auto") and (not _is_int(self.refresh_every) or self.refresh_every <= 0):
            raise ValueError(f"refresh_every must be a positive int, 'auto' or None; got {self.refresh_every!r}")
        if self.refit_every is not None and (not _is_int(self.refit_every) or self.refit_every < 1):
            raise ValueError(f"refit_every must be None or an int >= 1 (steps between svd refits); "
                             f"got {self.refit_every!r}")
        if not _is_int(self.calibrate_every) or self.calibrate_every < 1:
            raise ValueError(f"calibrate_every must be an int >= 1 (steps between exact calibration steps); "
                             f"got {self.calibrate_every!r}")
        _check_rate("feedback_lr", self.feedback_lr)
        _check_rate("feedback_weight_decay", self.feedback_weight_decay)
        clip = self.error_clip
        if not (clip is None or clip == "auto"):
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
                raise ValueError(f"error_clip must be a positive number, None or 'auto'; got {clip!r}")
        if isinstance(self.skip_branches, bool) or not isinstance(self.skip_branches, (int, float)) \
                or not 0 <= self.skip_branches < 1:
            raise ValueError(f"skip_branches must be a share 0 <= s < 1 of the residual branches; got {self.skip_branches!r}")
        if not _is_int(self.branch_bridge) or self.branch_bridge < 0:
            raise ValueError(f"branch_bridge must be an int >= 0 (the bridge's rank; 0: none); got {self.branch_bridge!r}")
        if not isinstance(self.branch_unbiased, bool):
            raise ValueError(f"branch_unbiased must be a bool; got {self.branch_unbiased!r}")
        if not isinstance(self.branch_tail, bool):
            raise ValueError(f"branch_tail must be a bool; got {self.branch_tail!r}")
        if self.branch_allocation not in get_args(BranchAllocation):
            raise ValueError(f"branch_allocation must be one of {get_args(BranchAllocation)}; got {self.branch_allocation!r}")
        if self.branch_unbiased and self.branch_allocation == "cut":
            raise ValueError("branch_unbiased needs one coin per branch; branch_allocation='cut' skips a bottom "
                             "prefix of branches, so their draws are not independent: use one or the other")
        _check_branch_map(self.branch_map)
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int; got {self.seed!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        ignored = [key for key in RULE_SETTINGS if key not in rule.settings and getattr(self, key) != defaults[key]]
        if ignored:
            warnings.warn(f"LDFAConfig: rule={self.rule!r} ignores {', '.join(f'{k}={getattr(self, k)!r}' for k in ignored)}"
                          f" (it reads {', '.join(rule.settings) or 'none of ' + ', '.join(RULE_SETTINGS)})",
                          LDFAWarning, stacklevel=3)

    @classmethod
    def for_finetuning(cls, **overrides: Any) -> "LDFAConfig":
        """The configuration we recommend for fine-tuning a pretrained transformer (full, LoRA or QLoRA).

        Skipping whole residual branches saves what replacing the frozen linears' input gradient
        cannot (docs/METHOD.md §3e). This is ``skip_branches=1/3, branch_allocation="bottom",
        branch_tail=True, exact_top=2/3``: the attention and MLP branches of the bottom third of
        the blocks run no backward at all, on every step; the error goes down their residual path,
        and their output projections (``o_proj``, ``down_proj``) still learn from it, while the top
        two thirds keep exact backprop. The exact LM head computes only the scored tokens' rows
        (``skip_zero_rows``). On a pretrained LLM the bottom blocks' adapters matter least
        (RESULTS.md h, i): 1.34× a step on SmolLM2-135M LoRA arithmetic SFT, 1.0 point behind plain
        LoRA (4 seeds). The model's family must be in ``ldfa_hf.branches.BRANCH_MAPPINGS``
        (Llama-style, GPT-2, GPT-NeoX, OPT, BERT-style, ViT), or name its branches with
        ``branch_map=...``. No low-rank feedback is involved (``rule="bp"``): on a pretrained LLM
        none measured so far beats skipping outright. v0.3.0's default, faster and less accurate, is
        ``for_finetuning(skip_branches=0.5, exact_top=0.5)``; v0.2.0's, the top two thirds exact and
        ``sampled`` rank-32 feedback below (parity in speed), is
        ``for_finetuning(rule="sampled", rank=32, exact_top=0.67, skip_branches=0.0)``.

        Example:
            >>> cfg = LDFAConfig.for_finetuning()
            >>> faster = LDFAConfig.for_finetuning(skip_branches=0.5, exact_top=0.5)  # v0.3.0's
            >>> cfg = LDFAConfig.for_finetuning(rule="sampled", rank=32, exact_top=0.67, skip_branches=0.0)
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"LDFAConfig.for_finetuning got unknown settings {unknown}; it takes {sorted(known)}")
        return cls(**{**FINETUNING, **overrides})

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LDFAConfig":
        if not isinstance(data, dict):
            raise TypeError(f"LDFAConfig.from_dict expects a dict; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"LDFAConfig: ignoring unknown keys {unknown}", LDFAWarning, stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "LDFAConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LDFA config not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as err:
            raise ValueError(f"LDFA config {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"LDFA config {path} is invalid: {err}") from None
