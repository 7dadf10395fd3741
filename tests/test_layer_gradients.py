"""Each layer kind's backward against autograd: input gradient (δP)Q, exact weight and bias gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import ldfa_hf
from ldfa_hf import LDFAConfig

from conftest import rel_err

RULES = ["svd", "local", "oja", "fixed", "fa", "bp"]


def run(module, x, seed=1):
    """Loss with a fixed random readout; returns (dL/dx, {param: grad}, dL/dy)."""
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    captured = {}
    y.register_hook(lambda g: captured.setdefault("dy", g))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * w).sum().backward()
    return x.grad, {n: p.grad for n, p in module.named_parameters()}, captured["dy"]


def feedback_matrix(plugin):
    ((name, hook),) = plugin.layers.items()
    return hook.P @ hook.Q


def linear_case(bias=True, lead=(2, 3)):
    torch.manual_seed(0)
    return nn.Linear(12, 7, bias=bias), torch.randn(*lead, 12)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 3)])
def test_linear_input_grad_is_delta_P_Q_and_weight_grad_exact(rule, bias, lead):
    layer, x = linear_case(bias, lead)
    ref_gx, ref_grads, _ = run(layer, x)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=3, rule=rule, error_clip=None))
    gx, grads, dy = run(layer, x)
    for name in ref_grads:  # invariant 2: local gradients untouched by any rule
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6), name
    if rule == "bp":
        assert rel_err(gx, ref_gx) <= 1e-6
    else:
        B = feedback_matrix(plugin)
        x2 = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(F.linear(x2, B), x2, dy)
        assert rel_err(gx, expected) <= 1e-5
        assert rel_err(gx, ref_gx) > 1e-3  # genuinely low-rank, not backprop
    plugin.detach()


@pytest.mark.parametrize("rule", ["svd", "local", "fixed", "bp"])
def test_conv1d_gpt2_layer(rule):
    torch.manual_seed(0)
    layer, x = Conv1D(7, 12), torch.randn(2, 4, 12)
    ref_gx, ref_grads, _ = run(layer, x)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=3, rule=rule, error_clip=None))
    assert plugin.targets[""].kind == "conv1d" and plugin.targets[""].shape == (7, 12)
    gx, grads, dy = run(layer, x)
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    if rule == "bp":
        assert rel_err(gx, ref_gx) <= 1e-6
    else:
        B = feedback_matrix(plugin)  # m × n = out × in; Conv1D stores the transpose
        x2 = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(F.linear(x2, B), x2, dy)
        assert rel_err(gx, expected) <= 1e-5


CONVS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=3, out_channels=5, kernel_size=(2, 3), stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=(1, 2), padding=(2, 1), dilation=2, bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=4, stride=4),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2),  # output does not tile the input exactly
]


@pytest.mark.parametrize("rule", ["svd", "local", "oja", "fixed", "bp"])
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: str(s))
def test_conv2d_layer(rule, spec):
    torch.manual_seed(0)
    layer, x = nn.Conv2d(**spec), torch.randn(2, spec["in_channels"], 9, 11)
    ref_gx, ref_grads, _ = run(layer, x)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=2, rule=rule, error_clip=None))
    gx, grads, dy = run(layer, x)
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5), name
    if rule == "bp":
        assert rel_err(gx, ref_gx) <= 1e-6
    else:
        kernel = feedback_matrix(plugin).reshape(layer.weight.shape)
        x2 = x.clone().requires_grad_(True)
        y2 = F.conv2d(x2, kernel, None, layer.stride, layer.padding, layer.dilation)
        (expected,) = torch.autograd.grad(y2, x2, dy)
        assert rel_err(gx, expected) <= 1e-5
        assert rel_err(gx, ref_gx) > 1e-3


@pytest.mark.filterwarnings("ignore:LDFA rule='svd' on a model whose targeted weights:ldfa_hf.LDFAWarning")
def test_frozen_weight_still_gets_ldfa_input_grad():
    layer, x = linear_case()
    layer.requires_grad_(False)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=3))
    x = x.clone().requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    expected = dy @ feedback_matrix(plugin)
    assert rel_err(gx, expected) <= 1e-5
    assert layer.weight.grad is None


def test_input_without_grad_adds_no_backward_node_for_stateless_rules():
    layer, x = linear_case()
    ldfa_hf.wrap(layer, LDFAConfig(rank=3, rule="svd"))
    y = layer(x)  # x needs no gradient and svd gathers nothing: plain layer output
    assert type(y.grad_fn).__name__ != "_FeedbackBackward"


def test_grouped_and_depthwise_convs_keep_exact_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 3, 1))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    assert list(plugin.targets) == ["2"]


def test_conv_with_reflect_padding_is_not_targeted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(4 * 25, 2))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    assert list(plugin.targets) == ["2"]


def test_error_clip_bounds_the_propagated_error():
    layer, x = linear_case()
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=3, rule="oja"))  # the rule's default clip: ±1
    x = x.clone().requires_grad_(True)
    y = layer(x)
    dy = 100 * torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    expected = (dy @ feedback_matrix(plugin)).clamp(-1, 1)
    assert gx.abs().max() <= 1.0 and torch.allclose(gx, expected, atol=1e-6)


def test_dfa_sends_the_output_error_straight_to_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="dfa"))
    x = torch.randn(5, 6, requires_grad=True)
    inputs, seen = {}, {}
    for i in (0, 2, 4):
        model[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]), prepend=True)
    out = model(x)
    out.register_hook(lambda g: seen.__setitem__("e", g))
    target = torch.randn(5, 3)
    grads = torch.autograd.grad(((out - target) ** 2).sum(), [inputs[0], inputs[2], inputs[4]])
    e = seen["e"]
    for i, g in zip((0, 2, 4), grads):
        B = plugin.layers[str(i)].P
        assert B.shape == (3, model[i].in_features)
        assert rel_err(g, e @ B) <= 1e-6, i


def test_dfa_maps_a_pooled_error_onto_a_whole_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="dfa"))
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    out = model(x)
    e = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, e)
    B = plugin.layers["0"].P
    assert B.shape == (3, 2 * 5 * 5) and rel_err(gx, (e @ B).reshape(x.shape)) <= 1e-6
    state = plugin.state_dict()  # B is re-made from the seed, so it is not stored
    assert not any(k.endswith(".P") for k in state)
