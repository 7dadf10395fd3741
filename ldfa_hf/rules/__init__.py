"""The feedback rules, one per file, and the registry that ``LDFAConfig(rule=...)`` reads.

    >>> import ldfa_hf
    >>> class MyRule(ldfa_hf.Rule):
    ...     name = "mine"
    >>> ldfa_hf.register_rule(MyRule)
    >>> ldfa_hf.LDFAConfig(rule="mine")
"""

from __future__ import annotations

from .base import Rule
from .bp import BP
from .calibrated import Calibrated
from .dfa import DFA
from .fixed import FA, Fixed
from .local import Local
from .oja import Oja
from .sampled import Sampled
from .streaming import Streaming
from .svd import SVD

RULES: dict[str, type[Rule]] = {}
BUILTIN = ("svd", "local", "oja", "calibrated", "streaming", "sampled", "fixed", "fa", "dfa", "bp")


def register_rule(cls: type[Rule], *, replace: bool = False) -> type[Rule]:
    """Make ``cls`` available as ``LDFAConfig(rule=cls.name)`` (usable as a class decorator).

    Re-registering a name needs ``replace=True``, except for the same class (a re-imported module).
    """
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError(f"register_rule expects a subclass of ldfa_hf.Rule; got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a rule's name must be a non-empty identifier-like string; {cls.__name__}.name is {name!r}")
    old = RULES.get(name)
    if old is not None and not replace and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"rule {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                         "pass replace=True to replace it")
    if not cls.label:
        cls.label = name
    RULES[name] = cls
    return cls


def rule_class(name: str) -> type[Rule]:
    """The registered rule called ``name``; an unknown name lists the known ones."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {name!r} "
                         "(a rule of your own needs ldfa_hf.register_rule first)") from None


def make_rule(config) -> Rule:
    return rule_class(config.rule)(config)


for _rule in (SVD, Local, Oja, Calibrated, Streaming, Sampled, Fixed, FA, DFA, BP):
    register_rule(_rule)

__all__ = ["BP", "BUILTIN", "DFA", "FA", "RULES", "Calibrated", "Fixed", "Local", "Oja", "Rule", "SVD", "Sampled", "Streaming",
           "make_rule", "register_rule", "rule_class"]
