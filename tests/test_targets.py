"""Which layers get feedback: all-linear, lists of suffixes, regexes, exclusions, ranks."""

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig

from conftest import tiny_bert, tiny_convnext, tiny_gpt2, tiny_llama


def test_all_linear_includes_the_output_head():
    plugin = ldfa_hf.wrap(tiny_llama(), LDFAConfig(rank=4))
    assert "lm_head" in plugin.targets
    assert len(plugin.targets) == 2 * 7 + 1  # q k v o gate up down per layer, plus the head


def test_gpt2_conv1d_layers_and_tied_head():
    plugin = ldfa_hf.wrap(tiny_gpt2(), LDFAConfig(rank=4))
    kinds = {n: t.kind for n, t in plugin.targets.items()}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["lm_head"] == "linear"
    assert plugin.targets["transformer.h.0.attn.c_attn"].shape == (48, 16)


def test_convnext_convs_with_and_without_include_conv():
    model = tiny_convnext()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=4))
    kinds = {n: t.kind for n, t in plugin.targets.items()}
    assert kinds["convnext.embeddings.patch_embeddings"] == "conv2d"
    assert not any("dwconv" in n for n in kinds)  # depthwise stays exact
    plugin.detach()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=4, include_conv=False))
    assert all(t.kind == "linear" for t in plugin.targets.values())


def test_list_matches_exact_names_and_suffixes():
    plugin = ldfa_hf.wrap(tiny_llama(), LDFAConfig(target_modules=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert sorted(plugin.targets) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                      "model.layers.1.self_attn.q_proj"]


def test_regex_matches_the_whole_name():
    plugin = ldfa_hf.wrap(tiny_llama(), LDFAConfig(target_modules=r".*\.layers\.0\..*_proj"))
    assert len(plugin.targets) == 7 and all(".layers.0." in n for n in plugin.targets)
    with pytest.raises(ValueError):  # fullmatch: a partial match is no match
        ldfa_hf.wrap(tiny_llama(), LDFAConfig(target_modules=r"q_proj"))


def test_exclude_modules():
    plugin = ldfa_hf.wrap(tiny_bert(), LDFAConfig(exclude_modules=["classifier", "pooler.dense"]))
    assert "classifier" not in plugin.targets and "bert.pooler.dense" not in plugin.targets
    assert "bert.encoder.layer.0.attention.self.query" in plugin.targets


def test_rank_is_capped_and_pattern_overrides():
    model = nn.Sequential(nn.Linear(10, 3), nn.Linear(3, 50), nn.Linear(50, 40))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=8, rank_pattern={"2": 30}))
    assert [t.rank for t in plugin.targets.values()] == [3, 3, 30]
    assert plugin.layers["2"].P.shape == (40, 30) and plugin.layers["2"].Q.shape == (30, 50)


def test_unmatched_rank_pattern_warns():
    with pytest.warns(UserWarning, match="rank_pattern keys \\['qkv'\\] match no targeted layer"):
        ldfa_hf.wrap(nn.Linear(4, 4), LDFAConfig(rank_pattern={"qkv": 3}))


def test_fa_is_full_rank_and_fixed_is_not_updated():
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 4))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="fa", rank=2))
    assert [t.rank for t in plugin.targets.values()] == [6, 4]
    before = [h.P.clone() for h in plugin.layers.values()]
    model(torch.randn(3, 10, requires_grad=True)).sum().backward()
    plugin.step()
    assert all(torch.equal(b, h.P) for b, h in zip(before, plugin.layers.values()))


def test_plain_sequential_and_kwarg_inputs():
    model = nn.Sequential(nn.Linear(4, 5))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    x = torch.randn(2, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(model[0](input=x).sum(), x)
    hook = plugin.layers["0"]
    assert torch.allclose(gx, torch.ones(2, 5) @ hook.P @ hook.Q, atol=1e-6)


class Packed4bit(torch.nn.Linear):
    """Stands in for a quantized layer (e.g. bitsandbytes 4-bit): two weights per byte, flattened."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        packed = torch.randint(0, 255, (n_in * n_out // 2, 1), dtype=torch.uint8)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)

    def forward(self, x):
        return x @ torch.ones(self.in_features, self.out_features)


def test_packed_linear_subclasses_are_left_exact_with_a_warning_naming_them():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Packed4bit(8, 8), torch.nn.Linear(8, 4))
    with pytest.warns(ldfa_hf.LDFAWarning, match=r"1 linear layer.*1 \(Packed4bit: its weight is stored as torch.uint8"):
        plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    assert list(plugin.targets) == ["0", "2"]
    model(torch.randn(3, 8, requires_grad=True)).sum().backward()
    plugin.step()


def test_only_packed_layers_is_a_clear_error_and_touches_nothing():
    model = torch.nn.Sequential(Packed4bit(8, 8))
    with pytest.warns(ldfa_hf.LDFAWarning), pytest.raises(ValueError, match="no layer LDFA can target"):
        ldfa_hf.wrap(model, LDFAConfig(rank=2))
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_layers_is_a_read_only_view_of_each_targeted_layer():
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="local", rank=2))
    layers = plugin.layers
    assert list(layers) == list(plugin.targets) == ["0", "2"]
    view = layers["2"]
    assert (view.kind, view.shape, view.rank, view.module) == ("linear", (4, 6), 2, model[2])
    assert view.P.shape == (4, 2) and view.Q.shape == (2, 6) and not view.P.requires_grad
    with pytest.raises(TypeError):
        layers["2"] = view
    model(torch.randn(3, 10, requires_grad=True)).sum().backward()
    view = plugin.layers["2"]
    assert view.forward_samples == 3 and view.pending_samples == 3 and set(view.statistics) == {"delta_xq", "z_x"}
    plugin.step()
    assert plugin.layers["2"].pending_samples == 0 and not plugin.layers["2"].statistics


def test_a_plain_string_target_that_names_layers_says_a_list_was_probably_meant():
    import pytest
    from transformers import LlamaConfig, LlamaForCausalLM

    import ldfa_hf
    from ldfa_hf import LDFAConfig

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"regular expression over the whole module name.*target_modules=\['q_proj'\]"):
        ldfa_hf.wrap(model, LDFAConfig(target_modules="q_proj"))
    assert len(ldfa_hf.wrap(model, LDFAConfig(target_modules=["q_proj"])).targets) == 1


def test_wrapping_a_model_without_adapters_imports_neither_peft_nor_bitsandbytes():
    """PEFT pulls in bitsandbytes, whose native threads made two-process gloo runs abort at exit;
    a model without adapters must not import it (a PEFT model's program imported PEFT already)."""
    import subprocess
    import sys

    code = ("import sys, torch, ldfa_hf\n"
            "model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
            "ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rank=2))\n"
            "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
