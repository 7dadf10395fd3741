"""Where the residual branches of a transformer block are, per model family.

A block adds two branches to its residual stream: attention and the MLP, each with its norm.
A branch is named by three modules inside the block: the one whose *input* is the branch's input
(the pre-norm, or the first layer of a post-norm branch), the one whose *output* is what the
block adds to the stream, and the branch's output projection (its last linear layer), whose
adapters can still learn when the rest of the branch skips its backward (``branch_tail``). The family knowledge lives in this one table, as PEFT's target-module
mappings do; a new family is one entry, and ``LDFAConfig(branch_map=...)`` names them for a model
the table lacks.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Union

from torch import nn


class BranchSpec(NamedTuple):
    blocks: str                         # regex for a block's name, matched at the end of the full name
    branches: dict                      # role → (input module, output module, output projection), in the block


_PRE_NORM_DECODER = BranchSpec(r"layers\.\d+", {"attention": ("input_layernorm", "self_attn", "self_attn.o_proj"),
                                                "mlp": ("post_attention_layernorm", "mlp", "mlp.down_proj")})

_POST_NORM_ENCODER = BranchSpec(r"layer\.\d+", {"attention": ("attention.self", "attention.output.dense",
                                                               "attention.output.dense"),
                                                 "mlp": ("intermediate", "output.dense", "output.dense")})

# a family whose module names changed across transformers versions lists one spec per layout
BRANCH_MAPPINGS: dict[str, Union[BranchSpec, tuple]] = {
    **{family: _PRE_NORM_DECODER for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                                "phi3", "olmo", "olmo2", "granite", "smollm3")},
    "gpt2": BranchSpec(r"h\.\d+", {"attention": ("ln_1", "attn", "attn.c_proj"), "mlp": ("ln_2", "mlp", "mlp.c_proj")}),
    "gpt_neox": BranchSpec(r"layers\.\d+", {"attention": ("input_layernorm", "attention", "attention.dense"),
                                             "mlp": ("post_attention_layernorm", "mlp", "mlp.dense_4h_to_h")}),
    # OPT's MLP is not a module: its branch ends at fc2, which is also its output projection
    "opt": BranchSpec(r"layers\.\d+", {"attention": ("self_attn_layer_norm", "self_attn", "self_attn.out_proj"),
                                        "mlp": ("final_layer_norm", "fc2", "fc2")}),
    # post-norm: the residual add and LayerNorm sit in the output module's parent, outside the branch
    **{family: _POST_NORM_ENCODER for family in ("bert", "roberta", "xlm-roberta", "camembert", "electra",
                                                 "deberta-v2")},
    "vit": (BranchSpec(r"layers\.\d+", {"attention": ("layernorm_before", "attention", "attention.o_proj"),
                                       "mlp": ("layernorm_after", "mlp", "mlp.fc2")}),  # transformers 5
            BranchSpec(r"layer\.\d+", {"attention": ("layernorm_before", "attention.output.dense",  # 4.x
                                                    "attention.output.dense"),
                                      "mlp": ("layernorm_after", "output.dense", "output.dense")})),
}


class Branch(NamedTuple):
    """One residual branch: ``"<block>.<role>"``, its depth (block index), its two end modules and
    its output projection."""

    name: str
    role: str
    depth: int
    input_module: nn.Module
    output_module: nn.Module
    tail_module: nn.Module


def model_type(model: nn.Module) -> Optional[str]:
    """``config.model_type`` of the model, or of the model a wrapper (PEFT) holds."""
    for module in model.modules():
        kind = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(kind, str):
            return kind
    return None


def specs_for(model: nn.Module, branch_map: Optional[dict]) -> tuple:
    if branch_map is not None:
        return (BranchSpec(branch_map["blocks"], {role: (ends[0], ends[1], ends[-1])
                                                  for role, ends in branch_map["branches"].items()}),)
    family = model_type(model)
    if family not in BRANCH_MAPPINGS:
        raise ValueError(
            f"LDFA branch skipping does not know where the residual branches of model_type {family!r} are "
            f"(known: {', '.join(sorted(BRANCH_MAPPINGS))}); name them with LDFAConfig(branch_map={{'blocks': "
            "r'layers\\.\\d+', 'branches': {'attention': ['input_layernorm', 'self_attn', 'self_attn.o_proj'], "
            "'mlp': ['post_attention_layernorm', 'mlp', 'mlp.down_proj']}})")
    entry = BRANCH_MAPPINGS[family]
    return (entry,) if isinstance(entry, BranchSpec) else entry


def find_branches(model: nn.Module, branch_map: Optional[dict] = None) -> list[Branch]:
    """Every block's branches, bottom block first; a model where none are found raises one error
    naming what was looked for. Nothing is changed."""
    modules = dict(model.named_modules())
    errors = []
    for spec in specs_for(model, branch_map):
        found, problem = _branches_by(spec, modules)
        if found:
            return found
        errors.append(f"blocks matching {spec.blocks!r} with branches {dict(spec.branches)}: {problem}")
    raise ValueError(f"LDFA found no residual branches in {type(model).__name__}: looked for {'; or '.join(errors)}")


def _branches_by(spec: BranchSpec, modules: dict) -> tuple[list, str]:
    pattern = re.compile(rf"(?:.*\.)?({spec.blocks})")
    blocks = [name for name in modules if pattern.fullmatch(name)]
    found, missing = [], []
    for depth, block in enumerate(blocks):
        for role, parts in spec.branches.items():
            ends = [modules.get(f"{block}.{part}" if block else part) for part in parts]
            if None in ends:
                missing.append(f"{block}.{parts[ends.index(None)]}")
                continue
            found.append(Branch(f"{block}.{role}", role, depth, *ends))
    if missing or not found:
        return [], (f"missing {missing[:3]}" if missing else "no block matched")
    return found, ""
