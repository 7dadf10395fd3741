"""Low-Dimensional Feedback Alignment for any Hugging Face (or plain PyTorch) model.

    >>> import ldfa_hf
    >>> plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=16))
    >>> loss.backward(); optimizer.step(); plugin.step()
"""

from .callback import LDFACallback
from .config import LDFAConfig, LDFAWarning
from .plugin import LDFAPlugin, wrap
from .targets import Target

__version__ = "0.1.0"

__all__ = ["LDFACallback", "LDFAConfig", "LDFAPlugin", "LDFAWarning", "Target", "wrap", "__version__"]
