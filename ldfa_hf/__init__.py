"""Low-Dimensional Feedback Alignment for any Hugging Face (or plain PyTorch) model.

    >>> import ldfa_hf
    >>> plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=16))
    >>> loss.backward(); optimizer.step(); plugin.step()

``LDFACallback`` (a ``transformers.TrainerCallback``) is imported on first use, so that
``import ldfa_hf`` does not pay for the Trainer and PEFT.
"""

from typing import Any

from . import pretrained
from .config import LDFAConfig, LDFAWarning
from .plugin import LDFAPlugin, wrap
from .rules import Rule, register_rule
from .targets import Target

__version__ = "0.4.0"

__all__ = ["LDFACallback", "LDFAConfig", "LDFAPlugin", "LDFAWarning", "Rule", "Target", "register_rule", "wrap",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LDFACallback":
        from .callback import LDFACallback

        return LDFACallback
    raise AttributeError(f"module 'ldfa_hf' has no attribute {name!r}")
