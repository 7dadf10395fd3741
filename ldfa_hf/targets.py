"""Which layers of a model get LDFA feedback, decided before anything is attached.

Like PEFT's target matching: every check runs first, and a spec that matches nothing
raises one error naming what was looked for and what the model has.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import NamedTuple, Optional, Union

from torch import nn

from .config import LDFAConfig, LDFAWarning
from .rules import rule_class
from .layers import Conv1D, Conv2dKind, kind_of, packed_weight_reason

_CONV1D = (Conv1D,) if Conv1D is not None else ()


class Target(NamedTuple):
    """One targeted layer: its kind, weight shape as ``(m, n)`` and the rank it uses."""

    kind: str
    shape: tuple
    rank: int


def _names(name: str, key: str) -> bool:
    """``key`` is the module's full name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def _matches(name: str, spec: Union[str, list, None]) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_names(name, key) for key in spec)


def _rank_key_matches(name: str, key: str) -> bool:
    """``rank_pattern`` keys: a full name, a dotted suffix, or a regex over the whole name."""
    return _names(name, key) or re.fullmatch(key, name) is not None


def _adapter_names(model: nn.Module) -> set:
    """Names of PEFT adapter sub-layers (lora_A, lora_B, ...): their gradients stay exact.

    PEFT is consulted only if the program imported it (a model with adapters did): importing it
    here would pull in bitsandbytes, whose native threads can abort a gloo worker at exit."""
    peft_tuners = sys.modules.get("peft.tuners.tuners_utils")
    if peft_tuners is None:
        return set()
    BaseTunerLayer = peft_tuners.BaseTunerLayer
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for child_name, child in module.named_modules():
                if child_name and not child_name.startswith("base_layer"):
                    names.add(f"{name}.{child_name}" if name else child_name)
    return names


def unused_copies(model: nn.Module) -> set:
    """Names of modules PEFT keeps but never runs in forward: a ``ModulesToSaveWrapper``'s
    ``original_module`` while an adapter's copy is active (the head of a PEFT classifier or reward
    model), and the copies of inactive adapters. Hooking them would cost nothing but would show
    a second head in ``summary()`` and hold feedback factors for a layer that never trains."""
    other = sys.modules.get("peft.utils.other")
    wrapper = getattr(other, "ModulesToSaveWrapper", None)
    if wrapper is None:
        return set()
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, wrapper) or getattr(module, "disable_adapters", False):
            continue
        active = set(getattr(module, "active_adapters", []) or [])
        copies = getattr(module, "modules_to_save", {})
        if not active & set(copies):
            continue
        prefix = f"{name}." if name else ""
        for child_name, _ in module.named_modules():
            head = child_name.split(".")
            if head[0] == "original_module" or (head[0] == "modules_to_save" and len(head) > 1 and head[1] not in active):
                names.add(prefix + child_name)
    return names


# where transformers' *ForSequenceClassification models keep their head (Llama-style and GPT-2:
# score; BERT, RoBERTa, DistilBERT: classifier; T5, BART: classification_head)
CLASSIFIER_HEADS = ("score", "classifier", "classification_head")


def sequence_classifier(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, module)`` of the transformers ``*ForSequenceClassification`` in ``model`` (not
    PEFT's wrapper of it), or ``None``."""
    return next(((n, m) for n, m in model.named_modules()
                 if type(m).__name__.endswith("ForSequenceClassification") and not type(m).__name__.startswith("Peft")),
                None)


def classifier_head(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, layer)``: the linear layer that gives a sequence classifier (or reward model) its
    scores, the copy that runs for a PEFT ``modules_to_save`` head; ``None`` if the model is not a
    ``*ForSequenceClassification``. One whose head is none of ``CLASSIFIER_HEADS``, or holds no
    linear layer, is refused: ``summary()`` and ``exact_top`` would describe the wrong layer."""
    found = sequence_classifier(model)
    if found is None:
        return None
    prefix, classifier = found
    attr = next((a for a in CLASSIFIER_HEADS if isinstance(getattr(classifier, a, None), nn.Module)), None)
    linears = []
    if attr is not None:
        unused = unused_copies(model)
        linears = [(n, m) for n, m in getattr(classifier, attr).named_modules(prefix=f"{prefix}.{attr}" if prefix else attr)
                   if n not in unused and "lora_" not in n and isinstance(m, (nn.Linear, *_CONV1D))]
    if not linears:
        raise ValueError(
            f"LDFA cannot find the head of {type(classifier).__name__}: it looked for a linear layer in "
            + (f"its {attr!r} module" if attr else f"a module named one of {list(CLASSIFIER_HEADS)}")
            + f"; its children are {[n for n, _ in classifier.named_children()]}. "
            "Name your head one of those, or wrap the model's backbone instead")
    return linears[-1]


def rank_for(name: str, shape: tuple, config: LDFAConfig) -> int:
    """``min(rank, m, n)``; ``rank_pattern`` overrides by exact name, suffix or regex.

    Full-rank rules (``fa``, ``dfa``, ``bp``) always use ``min(m, n)``.
    """
    m, n = shape
    if rule_class(config.rule).full_rank:
        return min(m, n)
    rank = config.rank
    for key, value in config.rank_pattern.items():
        if _rank_key_matches(name, key):
            rank = value
            break
    return min(rank, m, n)


def find_targets(model: nn.Module, config: LDFAConfig) -> dict[str, tuple[nn.Module, object, Target]]:
    """Map module name → (module, layer kind, Target) for every layer LDFA will hook."""
    adapters = _adapter_names(model) | unused_copies(model)
    supported, unsupported_hits, packed = {}, [], []
    for name, module in model.named_modules():
        if name in adapters:
            continue
        kind = kind_of(module)
        reason = packed_weight_reason(module) if isinstance(module, (nn.Linear, *_CONV1D)) else None
        if reason is not None and not _matches(name, config.exclude_modules):
            packed.append(f"{name} ({type(module).__name__}: {reason})")
        if kind is None:
            if name and config.target_modules != "all-linear" and _matches(name, config.target_modules):
                unsupported_hits.append(f"{name} ({type(module).__name__})")
            continue
        supported[name] = (module, kind)

    if packed:
        warnings.warn(f"LDFA leaves {len(packed)} linear layer(s) with packed or quantized weights exact: "
                      + "; ".join(packed[:4]) + (" ..." if len(packed) > 4 else ""), LDFAWarning, stacklevel=4)
    if not supported:
        raise ValueError(
            f"{type(model).__name__} has no layer LDFA can target "
            "(nn.Linear, GPT-2 Conv1D, or nn.Conv2d with groups == 1 and zero padding)"
        )

    if config.target_modules == "all-linear":
        chosen = {
            n: mk for n, mk in supported.items() if mk[1] is not Conv2dKind or config.include_conv
        }
    else:
        chosen = {n: mk for n, mk in supported.items() if _matches(n, config.target_modules)}
    if not chosen:
        available = ", ".join(list(supported)[:12]) + (" ..." if len(supported) > 12 else "")
        extra = f"; it matched only layers LDFA does not target: {', '.join(unsupported_hits[:6])}" if unsupported_hits else ""
        spec = config.target_modules
        if isinstance(spec, str) and any(_names(n, spec) for n in supported):
            extra += (f". A string is a regular expression over the whole module name; for the layers named "
                      f"{spec!r} pass a list, target_modules=[{spec!r}], or the regex '.*{spec}'")
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no targetable layer{extra}. "
            f"Targetable layers are: {available}"
        )
    kept = {n: mk for n, mk in chosen.items() if not _matches(n, config.exclude_modules)}
    if not kept:
        raise ValueError(
            f"exclude_modules={config.exclude_modules!r} excludes every one of the "
            f"{len(chosen)} layers matched by target_modules={config.target_modules!r}"
        )
    if config.exact_top:  # the layers nearest the output (last in module order) keep exact backprop
        names = list(kept)
        kept = {n: kept[n] for n in names[:len(names) - round(config.exact_top * len(names))]}
        if not kept:
            raise ValueError(f"exact_top={config.exact_top} leaves none of the {len(names)} targeted layers to LDFA")
    result = {}
    for name, (module, kind) in kept.items():
        shape = kind.shape(module)
        result[name] = (module, kind, Target(kind.name, shape, rank_for(name, shape, config)))
    return result


def unmatched_rank_patterns(targets: dict, config: LDFAConfig) -> list:
    """``rank_pattern`` keys that name no targeted layer (almost always a typo)."""
    missing = []
    for key in config.rank_pattern:
        if not any(_rank_key_matches(n, key) for n in targets):
            missing.append(key)
    return missing


def existing_hook_owner(model: nn.Module) -> Optional[str]:
    """Name of a module already carrying an LDFA hook, if any."""
    from .feedback import registered_hook

    for name, module in model.named_modules():
        for hook in list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values()):
            if registered_hook(hook) is not None:
                return name or "<root>"
    return None
