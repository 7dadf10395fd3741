"""What each rule gathers in backward, against autograd, for Linear, GPT-2 Conv1D and Conv2d.

``local`` and ``oja`` feed Q (and local P) the gradients of the task loss as if the layer's
weight were P Q; the calibration rules sketch the exact input gradients δW. Each statistic is
compared with autograd on a layer whose weight *is* P Q (or with the exact input gradient)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import ldfa_hf
from ldfa_hf import LDFAConfig


def make(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(10, 7), torch.randn(3, 5, 10)
    if kind == "conv1d":
        return Conv1D(7, 10), torch.randn(3, 5, 10)
    return nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), torch.randn(2, 4, 7, 7)


def as_if_weight(module, W, x):
    """The layer's forward with weight matrix W (m × n) in place of its own."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, W.reshape(module.weight.shape), module.bias, module.stride, module.padding, module.dilation)
    return x @ W.T + module.bias


def backward_with_random_error(plugin, module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    delta = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * delta).sum().backward()
    return x, delta, plugin.layers[""]


def rows(t, conv):
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if conv else t.reshape(-1, t.shape[-1])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_local_statistics_are_the_task_gradients_of_p_and_q(kind):
    module, x = make(kind)
    plugin = ldfa_hf.wrap(module, LDFAConfig(rule="local", rank=3))
    x, delta, view = backward_with_random_error(plugin, module, x)
    P = view.P.clone().requires_grad_(True)
    Q = view.Q.clone().requires_grad_(True)
    (as_if_weight(module, P @ Q, x.detach()) * delta).sum().backward()
    assert torch.allclose(view.statistics["delta_xq"], P.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(view.statistics["z_x"], Q.grad, rtol=1e-4, atol=1e-5)
    assert view.pending_samples == rows(delta, kind == "conv2d").shape[0]


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_oja_statistics_are_error_moments_and_the_q_gradient(kind):
    module, x = make(kind)
    plugin = ldfa_hf.wrap(module, LDFAConfig(rule="oja", rank=3))
    x, delta, view = backward_with_random_error(plugin, module, x)
    d = rows(delta, kind == "conv2d")
    assert torch.allclose(view.statistics["delta_z"], d.T @ (d @ view.P), rtol=1e-4, atol=1e-5)
    assert torch.allclose(view.statistics["delta_sum"], d.sum(0), atol=1e-5)
    assert torch.allclose(view.statistics["delta_sq"], (d * d).sum(0), rtol=1e-5)
    P, Q = view.P.clone(), view.Q.clone().requires_grad_(True)
    (as_if_weight(module, P @ Q, x.detach()) * delta).sum().backward()
    assert torch.allclose(view.statistics["z_x"], Q.grad, rtol=1e-4, atol=1e-5)


def exact_input_rows(module, x, delta):
    """δW per sample (for a conv, per output position in patch space), from autograd."""
    W = module.weight.detach() if not isinstance(module, Conv1D) else module.weight.detach().T
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x.detach(), module.kernel_size, module.dilation, module.padding, module.stride)
        patches = patches.transpose(1, 2).requires_grad_(True)  # (images, positions, C_in·kh·kw)
        out = patches @ W.reshape(W.shape[0], -1).T  # (images, positions, C_out)
        (out * delta.flatten(2).transpose(1, 2)).sum().backward()
        return patches.grad.reshape(-1, patches.shape[-1])
    xx = x.detach().clone().requires_grad_(True)
    (as_if_weight(module, W, xx) * delta).sum().backward()
    return xx.grad.reshape(-1, xx.shape[-1])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_calibration_sketch_is_of_the_exact_input_gradients(kind):
    module, x = make(kind)
    plugin = ldfa_hf.wrap(module, LDFAConfig(rule="calibrated", rank=2))
    x, delta, view = backward_with_random_error(plugin, module, x)
    d = exact_input_rows(module, x, delta)
    omega = plugin.rule.test_matrix("", view.shape, view.rank, d.device)
    assert torch.allclose(view.statistics["sketch"], d.T @ (d @ omega), rtol=1e-4, atol=1e-4)
    if kind != "conv2d":  # the calibration step sends backprop's own input gradient down
        assert torch.allclose(x.grad.reshape(-1, x.shape[-1]), d, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_streaming_sketches_the_exact_gradients_of_the_largest_errors(kind):
    module, x = make(kind)
    plugin = ldfa_hf.wrap(module, LDFAConfig(rule="streaming", rank=2, rule_options={"rows": 4}))
    x0, delta0, _ = backward_with_random_error(plugin, module, x)
    plugin.step()  # step 0 was exact; from now on each step sketches 4 rows
    x, delta, view = backward_with_random_error(plugin, module, x)
    d_all = exact_input_rows(module, x, delta)
    g = rows(delta, kind == "conv2d")
    pick = g.square().sum(1).topk(4).indices
    d = d_all[pick]
    omega = plugin.rule.test_matrix("", view.shape, view.rank, d.device)
    assert view.pending_samples == 4
    assert torch.allclose(view.statistics["sketch"], d.T @ (d @ omega), rtol=1e-4, atol=1e-4)
    # the rows do not leak into what is sent down: that is (δ P) Q
    if kind != "conv2d":
        expected = (delta.reshape(-1, delta.shape[-1]) @ view.P) @ view.Q
        assert torch.allclose(x.grad.reshape(-1, x.shape[-1]), expected, atol=1e-5)
