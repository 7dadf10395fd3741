"""Copies of a wrapped model: deepcopy (EMA / reference models) and torch.save give plain models."""

import copy
import io

import torch

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.feedback import orphans

from conftest import batch_for, clone, param_grads, rel_err, tiny_bert


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_deepcopy_of_a_wrapped_model_is_a_plain_model_that_can_be_wrapped_again():
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert")
    plain = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2))
    model(**batch).loss.backward()
    plugin.step()

    copied = copy.deepcopy(model)
    assert sum(orphans(m) for m in copied.modules()) == 2 * len(plugin.targets)  # inert until its first forward
    got, expected = param_grads(copied, batch), param_grads(plain, batch)   # exact backprop
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-6, key
    assert _hook_count(copied) == 0                                           # gone after one forward
    names = list(plugin.targets)
    plugin.detach()
    assert _hook_count(model) == 0
    other = ldfa_hf.wrap(copied, LDFAConfig(rank=2))                          # wraps like any model
    assert list(other.targets) == names
    copied_modules = dict(copied.named_modules())
    assert all(view.module is copied_modules[name] for name, view in other.layers.items())


def test_deepcopy_leaves_the_original_wrapped():
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert")
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="fixed", rank=2))
    reference = clone(model)  # taken while wrapped
    before = param_grads(model, batch)
    param_grads(reference, batch)
    after = param_grads(model, batch)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert _hook_count(model) == 2 * len(plugin.targets)


def test_torch_save_of_a_wrapped_model_loads_as_a_plain_model():
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert")
    plain = clone(model)
    ldfa_hf.wrap(model, LDFAConfig(rule="svd", rank=2))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    got, expected = param_grads(loaded, batch), param_grads(plain, batch)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-6, key
    assert _hook_count(loaded) == 0
