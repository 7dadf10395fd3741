"""Models built on the meta device (before loading or sharding): wrap first, factors once weights are real."""

import pytest
import torch

import ldfa_hf
from ldfa_hf import LDFAConfig

from conftest import batch_for, layer_input_grads, param_grads, rel_err


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)


def real_and_meta():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    real = LlamaForCausalLM(llama_config())
    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config())
    return real, meta


def load(meta, real):
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        for (_, mine), (_, theirs) in zip(meta.named_buffers(), real.named_buffers()):
            mine.copy_(theirs)
    meta.train()


@pytest.mark.parametrize("rule", ["svd", "calibrated", "local"])
@pytest.mark.parametrize("explicit", [True, False])
def test_meta_wrapped_model_gets_the_factors_and_gradients_of_a_real_one(rule, explicit):
    real, meta = real_and_meta()
    batch = batch_for("llama")
    real_plugin = ldfa_hf.wrap(real, LDFAConfig(rule=rule, rank=4))
    meta_plugin = ldfa_hf.wrap(meta, LDFAConfig(rule=rule, rank=4))
    assert not meta_plugin.materialized and all(v.P is None for v in meta_plugin.layers.values())
    load(meta, real)
    if explicit:
        meta_plugin.materialize()
        assert meta_plugin.materialized
    expected, got = param_grads(real, batch), param_grads(meta, batch)  # the first forward materialises
    assert meta_plugin.materialized
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-6, key
    for name, view in real_plugin.layers.items():
        assert torch.equal(view.P, meta_plugin.layers[name].P) and torch.equal(view.Q, meta_plugin.layers[name].Q)
    real_plugin.step(), meta_plugin.step()
    names = list(real_plugin.targets)
    got, expected = layer_input_grads(meta, names, batch), layer_input_grads(real, names, batch)
    for name in expected:
        assert rel_err(got[name], expected[name]) < 1e-5, name


def test_accelerate_init_empty_weights_is_supported():
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    real = LlamaForCausalLM(llama_config())
    with init_empty_weights():
        meta = LlamaForCausalLM(llama_config())
    plugin = ldfa_hf.wrap(meta, LDFAConfig(rank=4))
    load(meta, real)
    plugin.materialize()
    reference = ldfa_hf.wrap(real, LDFAConfig(rank=4))
    for name, view in reference.layers.items():
        assert torch.equal(view.P, plugin.layers[name].P)


def test_anything_needing_factors_before_materialisation_names_materialize():
    _, meta = real_and_meta()
    plugin = ldfa_hf.wrap(meta, LDFAConfig(rank=4))
    for call in (plugin.stats, plugin.state_dict, plugin.step):
        with pytest.raises(RuntimeError, match=r"materialize\(\)"):
            call()
    with pytest.raises(ValueError, match="still on the meta device"):
        plugin.materialize()  # weights not loaded yet
    assert not plugin.materialized
    assert plugin.cost()["backward_bp"] > 0  # shapes are enough for the estimate
