"""The invariants 1–4 of docs/METHOD.md §4 on tiny GPT-2, Llama, BERT, ViT and ConvNeXt models."""

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.feedback import registered_hook

from conftest import clone, layer_input_grads, param_grads, rel_err

EXACT = [
    LDFAConfig(rule="bp"),
    LDFAConfig(rule="svd", rank=10_000, refresh_every=1),
]


@pytest.mark.parametrize("config", EXACT, ids=["bp", "svd-full-rank"])
def test_invariant1_exact_rules_match_autograd(hf_model, config):
    name, model, batch = hf_model
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, config)
    kinds = {t.kind for t in plugin.targets.values()}
    assert "linear" in kinds or "conv1d" in kinds
    if name == "convnext":
        assert "conv2d" in kinds
    if name == "gpt2":
        assert "conv1d" in kinds
    names = list(plugin.targets)
    expected = layer_input_grads(reference, names, batch)
    got = layer_input_grads(model, names, batch)
    assert set(got) == set(expected) and len(got) >= len(names) - 1
    for layer in expected:
        assert rel_err(got[layer], expected[layer]) <= 1e-5, layer

    # one optimizer step later, the refreshed factors still give autograd's gradient
    for m in (model, reference):
        torch.manual_seed(1)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(**batch).loss.backward()
        opt.step()
    plugin.step()
    expected = layer_input_grads(reference, names, batch)
    got = layer_input_grads(model, names, batch)
    for layer in expected:
        assert rel_err(got[layer], expected[layer]) <= 1e-5, layer


def _local_weight_grads(model, plugin, batch):
    """Expected ``δᵀx`` for each targeted layer, from the error that reached it under LDFA."""
    modules = dict(model.named_modules())
    seen, handles = {}, []
    for name in plugin.targets:
        def record(module, args, output, name=name):
            seen[name] = (args[0], output)
            output.register_hook(lambda g: seen.__setitem__(name, seen[name] + (g,)))
        handles.append(modules[name].register_forward_hook(record))
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("rule", ["svd", "local", "oja", "calibrated", "fixed", "fa", "dfa"])
def test_invariant2_weight_and_bias_grads_are_the_exact_local_ones(hf_model, rule):
    name, model, batch = hf_model
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=2))
    seen = _local_weight_grads(model, plugin, batch)
    modules = dict(model.named_modules())
    counts = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    checked = 0
    for layer, record in seen.items():
        module = modules[layer]
        if counts[id(module.weight)] > 1 or len(record) < 3:
            continue  # tied weights collect gradient from elsewhere too
        x, _, delta = record
        params = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
        with plugin.disabled():
            local = torch.autograd.grad(module(x.detach()), params, delta)
        for p, g in zip(params, local):
            assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), layer
        checked += 1
    assert checked >= len(seen) - 1


def _snapshot(model):
    return {
        name: (type(m), sorted(vars(m)), dict(m._forward_hooks), dict(m._forward_pre_hooks),
               dict(m._backward_hooks), sorted(dict(m.named_buffers(recurse=False))))
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("rule", ["oja", "calibrated"])
def test_invariant3_detach_restores_the_model_exactly(hf_model, rule):
    name, model, batch = hf_model
    reference = clone(model)
    before = _snapshot(model)
    keys = list(model.state_dict())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=2))
    model(**batch).loss.backward()
    plugin.step()
    plugin.detach()
    assert _snapshot(model) == before
    assert list(model.state_dict()) == keys
    assert not any(registered_hook(h) is not None
                   for m in model.modules() for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()))
    got, expected = param_grads(model, batch), param_grads(reference, batch)
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_state_dict_keys_unchanged_while_wrapped(hf_model):
    name, model, batch = hf_model
    keys = list(model.state_dict())
    n_params = len(list(model.parameters()))
    ldfa_hf.wrap(model, LDFAConfig(rank=2))
    assert list(model.state_dict()) == keys
    assert len(list(model.parameters())) == n_params


def _principal_angle(P, U):
    Qp = torch.linalg.qr(P).Q
    s = torch.linalg.svdvals(U.T @ Qp).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(s.min())))


def test_invariant4_oja_reaches_top_r_error_subspace():
    torch.manual_seed(0)
    m, n, r = 12, 6, 3
    basis = torch.linalg.qr(torch.randn(m, m)).Q
    spectrum = torch.tensor([5.0, 4.0, 3.0] + [0.5] * (m - 3))
    mix = basis * spectrum.sqrt()
    layer = nn.Linear(n, m)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="oja", rank=r, feedback_lr=0.01, error_clip=None))
    start = _principal_angle(plugin.layers[""].P, basis[:, :r])
    gen = torch.Generator().manual_seed(1)
    for _ in range(600):
        x = torch.randn(64, n, generator=gen, requires_grad=True)
        delta = torch.randn(64, m, generator=gen) @ mix.T  # stationary error stream, covariance mix mixᵀ
        (layer(x) * delta).sum().backward()
        layer.zero_grad()
        plugin.step()
    end = _principal_angle(plugin.layers[""].P, basis[:, :r])
    assert start > 30 and end < 8, (start, end)
