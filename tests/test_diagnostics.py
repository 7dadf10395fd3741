"""summary() and stats(): feedback error, probed gradient angles, the FLOP estimate."""

import math

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig

from conftest import batch_for, tiny_llama


def test_summary_lists_layers_ranks_and_saving():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=8))
    model(torch.randn(64, 256)).sum().backward()
    lines = []
    assert plugin.summary(print_fn=lines.append) is None  # printed once, not echoed again by a REPL
    text = plugin.summary(print_fn=None)
    assert lines == [text]
    rows = [line.split()[:4] for line in text.splitlines()]
    assert ["2", "[0,2]", "linear", "256"] in rows and ["1", "4", "linear", "10"] in rows  # by role and shape
    assert "feedback parameters: 10,320" in text  # 8·512 + 8·512 + 8·266
    cost = plugin.cost()
    N, mn = 64, 256 * 256
    # layer 0's input needs no gradient, so backprop skips it too and nothing is saved there
    assert cost["backward_bp"] == N * mn + 2 * N * mn + 2 * N * 2560
    rule = 2 * 8 * (mn + 2560)  # svd descent: 2·m·n·r per layer and step (not layer 0: its feedback is unused)
    assert cost["backward_ldfa"] == N * mn + (N * mn + N * 8 * 512) + (N * 2560 + N * 8 * 266) + rule
    assert f"{100 * cost['backward_saved']:.1f}% fewer" in text and "last training forward" in text
    assert not cost["assumed"]


def test_bp_rule_saves_nothing():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
    assert plugin.cost()["backward_saved"] == 0.0


def test_feedback_error_is_the_eckart_young_residual():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=4))
    s = torch.linalg.svdvals(layer.weight.detach())
    expected = float(s[4:].norm() / s.norm())
    assert math.isclose(plugin.stats()["layers"][""]["feedback_error"], expected, rel_tol=1e-4)
    plugin.detach()
    assert ldfa_hf.wrap(layer, LDFAConfig(rule="bp")).stats()["mean_feedback_error"] == 0.0


def test_svd_descent_tracks_a_moving_weight():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=8, refresh_every=None))
    best = lambda: float(torch.linalg.svdvals(layer.weight.detach())[8:].norm() / layer.weight.detach().norm())
    drift = torch.randn(48, 64) * 0.002
    for _ in range(100):
        with torch.no_grad():
            layer.weight += drift
        plugin.step()
    assert plugin.stats()["mean_feedback_error"] < best() + 0.05


def test_probed_angles_zero_for_bp_and_positive_for_fixed_low_rank():
    torch.manual_seed(0)
    model, batch = tiny_llama(), batch_for("llama")
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
    stats = plugin.stats(batch)
    assert stats["mean_angle"] < 1e-2
    plugin.detach()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="fixed", rank=1))
    stats = plugin.stats(batch)
    assert stats["mean_angle"] > 10
    assert all(p.grad is None for p in model.parameters())  # probing leaves .grad alone
    assert all(h.pending_samples == 0 for h in plugin.layers.values())


def test_probe_keeps_buffers_and_uses_the_same_dropout_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 8, requires_grad=True)
    stats = plugin.stats(x, loss_fn=lambda out: out.square().mean())
    assert stats["layers"]["3"]["angle"] < 1e-2  # same mask in both passes
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dfa_diagnostics():
    torch.manual_seed(0)
    model, batch = tiny_llama(), batch_for("llama")
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="dfa"))
    stats = plugin.stats(batch)
    assert math.isnan(stats["mean_feedback_error"]) and stats["mean_angle"] > 10
    assert "15 layers get rank-16 feedback (rule 'dfa')" in plugin.summary(print_fn=None)


@pytest.mark.filterwarnings("ignore:LDFA rule='svd' on a model whose targeted weights:ldfa_hf.LDFAWarning")
def test_frozen_weights_cost_no_weight_gradient_and_no_svd_descent():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)  # LoRA's base: frozen, its error still flows down
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=4))
    model(torch.randn(32, 64, requires_grad=True)).sum().backward()
    cost, N = plugin.cost(), 32
    assert cost["backward_bp"] == N * 64 * 64 * 2 + N * 640 * 2  # frozen: only δ W, trained: δ W and δᵀx
    assert cost["backward_ldfa"] == 2 * N * 4 * 128 + N * 640 + N * 4 * 74 + cost["rule"]
    assert cost["rule"] == 2 * 640 * 4  # the svd descent only for the trained head


@pytest.mark.filterwarnings("ignore:LDFA rule='svd' on a model whose targeted weights:ldfa_hf.LDFAWarning")
def test_svd_rule_leaves_factors_of_frozen_weights_at_their_svd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 6))
    model[0].weight.requires_grad_(False)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=4, refresh_every=None))
    factors = lambda: [plugin.state_dict()[k].clone() for k in ("0.P", "0.Q", "2.P", "2.Q")]  # noqa: E731
    before = factors()
    with torch.no_grad():
        model[2].weight.add_(0.05 * torch.randn_like(model[2].weight))  # the head moves, the base cannot
    for _ in range(5):
        model(torch.randn(16, 48, requires_grad=True)).sum().backward()
        plugin.step()
    after = factors()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.equal(before[2], after[2])  # the trained layer still descends
    # what the frozen layer keeps is the best rank-4 approximation (Eckart–Young), up to the
    # randomised SVD's error (0.25% on this flat random spectrum; random factors would be ~100%)
    s = torch.linalg.svdvals(model[0].weight)
    assert math.isclose(plugin.stats()["layers"]["0"]["feedback_error"], float(s[4:].norm() / s.norm()), rel_tol=1e-2)
