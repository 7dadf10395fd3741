"""The svd rule's alternating-least-squares refit (docs/METHOD.md §2): what it converges to,
when it runs, what it skips, and the paper's per-step descent kept as a switch."""

import math

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.rules import SVD


def eckart_young(W: torch.Tensor, r: int) -> float:
    """Relative error of the best rank-r approximation of W."""
    s = torch.linalg.svdvals(W.detach())
    return float(s[r:].norm() / s.norm())


def factors(plugin, name):
    view = plugin.layers[name]
    return view.P.clone(), view.Q.clone()


def test_refits_converge_to_the_best_rank_r_approximation_of_a_new_weight():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=6, refit_every=1, refresh_every=None))
    U, _ = torch.linalg.qr(torch.randn(48, 48))
    V, _ = torch.linalg.qr(torch.randn(64, 48))
    with torch.no_grad():  # a weight the attach-time factors know nothing about, with a decaying spectrum
        layer.weight.copy_(U @ torch.diag(0.7 ** torch.arange(48.0)) @ V.T)
    assert plugin.stats()["mean_feedback_error"] > 0.5
    for _ in range(30):
        plugin.step()
    assert math.isclose(plugin.stats()["mean_feedback_error"], eckart_young(layer.weight, 6), rel_tol=1e-3)
    P, Q = factors(plugin, "")
    # balanced: P = U S^½ and Q = S^½ Vᵀ have equal column / row norms
    torch.testing.assert_close(P.norm(dim=0), Q.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_refit_runs_every_refit_every_steps_only():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=4, refit_every=3, refresh_every=None))
    changed = []  # (the default descent would move every step)
    for _ in range(6):
        before = factors(plugin, "")
        with torch.no_grad():
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
        plugin.step()
        after = factors(plugin, "")
        changed.append(not (torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])))
    assert changed == [False, False, True, False, False, True]
    assert plugin.cost()["rule"] == 2 * 24 * 32 * 4 // 3  # 2·m·n·r per refit, every 3 steps


def test_batched_refit_equals_one_layer_at_a_time():
    torch.manual_seed(0)
    W, P, Q = torch.randn(3, 20, 16), torch.randn(3, 20, 4), torch.randn(3, 4, 16)
    Pb, Qb = SVD._refit(W, P, Q)
    for i in range(3):
        Pi, Qi = SVD._refit(W[i], P[i], Q[i])
        torch.testing.assert_close(Pb[i] @ Qb[i], Pi @ Qi, rtol=1e-4, atol=1e-5)


def test_refit_leaves_unused_feedback_and_frozen_weights_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    model[2].weight.requires_grad_(False)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2, refit_every=1, refresh_every=None))
    before = {name: factors(plugin, name) for name in ("0", "2", "4")}
    model(torch.randn(8, 16)).sum().backward()  # layer 0's input needs no gradient: its feedback is never used
    with torch.no_grad():
        for layer in (model[0], model[4]):
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    plugin.step()
    assert not plugin.layers["0"].input_grad
    for name in ("0", "2"):
        assert all(torch.equal(a, b) for a, b in zip(before[name], factors(plugin, name)))
    assert not torch.equal(before["4"][0], factors(plugin, "4")[0])


def test_non_finite_weight_skips_the_refit_and_counts_it():
    layer = nn.Linear(8, 6)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=2, refit_every=1, refresh_every=None))
    before = factors(plugin, "")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.warns(ldfa_hf.LDFAWarning, match="non-finite"):
        plugin.step()
    assert all(torch.equal(a, b) for a, b in zip(before, factors(plugin, "")))
    assert plugin.layers[""].skipped == 1


def test_default_is_the_papers_per_step_adamw_descent():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=4, refresh_every=None))
    assert plugin.rule.update_style == "descent" and plugin.rule.trains and not plugin.rule.refits
    before = factors(plugin, "")
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    plugin.step()  # every step
    assert not torch.equal(before[0], factors(plugin, "")[0])
    assert ".P.exp_avg" in "".join(plugin.state_dict())  # AdamW state travels with the checkpoint
    refit = ldfa_hf.wrap(nn.Linear(32, 24), LDFAConfig(rank=4, refit_every=4))
    assert refit.rule.refits and not refit.rule.trains and not any("exp_avg" in k for k in refit.state_dict())


def test_bad_refit_every_is_refused():
    with pytest.raises(ValueError, match="refit_every must be None or an int >= 1"):
        LDFAConfig(refit_every=0)


@pytest.mark.parametrize("rule", ["local", "oja"])
def test_local_rules_gather_nothing_for_an_input_that_needs_no_gradient(rule):
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2, rule=rule))
    model(torch.randn(8, 16)).sum().backward()
    assert plugin.layers["0"].pending_samples == 0 and not plugin.layers["0"].statistics
    assert plugin.layers["2"].pending_samples == 8


def test_a_zero_weight_at_attach_gets_real_factors_once_it_trains():
    layer = nn.Linear(16, 12)
    with torch.no_grad():
        layer.weight.zero_()  # a zero-initialised head: its SVD at attach is all zeros
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rank=3, refit_every=1, refresh_every=None))
    assert not plugin.layers[""].P.any()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16))
    for _ in range(20):
        plugin.step()
    assert math.isclose(plugin.stats()["mean_feedback_error"], eckart_young(layer.weight, 3), rel_tol=1e-2)
