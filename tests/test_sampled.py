"""``sampled``: low-rank feedback plus an importance-sampled correction from exact rows, so the
input gradient is unbiased (its mean over row draws is backprop's)."""

import copy

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.rules.sampled import inclusion_probabilities

from conftest import tiny_llama


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 5))


X = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(3))


def input_grad(model, x=X):
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    return x.grad


def test_inclusion_probabilities_are_capped_proportional_and_spend_the_budget():
    w = torch.tensor([0.0, 1.0, 1.0, 2.0, 100.0, 0.0])
    pi = inclusion_probabilities(w, budget=3.0)
    assert pi[0] == 0 and pi[5] == 0           # rows without error are never computed
    assert pi[4] == 1                          # a dominant error is always exact
    assert torch.allclose(pi.sum(), torch.tensor(3.0))
    assert torch.allclose(pi[1:4], torch.tensor([0.5, 0.5, 1.0]))  # the rest share 2 rows by weight
    assert torch.equal(inclusion_probabilities(w, budget=10.0), (w > 0).float())  # budget > rows with error


def test_the_mean_over_row_draws_is_the_exact_input_gradient():
    model = mlp()
    exact = input_grad(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="sampled", rank=2, rule_options={"fraction": 0.4}))
    model.train()
    draws = []
    for _ in range(300):  # the weights never change; the factors do (every re-aim), which keeps it unbiased
        draws.append(input_grad(model))
        plugin.step()
    one = (draws[0] - exact).norm() / exact.norm()
    mean = (torch.stack(draws).mean(0) - exact).norm() / exact.norm()
    assert one > 0.1            # a single draw is noisy: this is not backprop in disguise
    assert mean < one / 5       # ... and its noise averages out (300 draws: ~1/17 of it expected)


def test_fraction_one_takes_every_row_with_an_error_and_is_exact():
    model = mlp()
    exact = input_grad(model)
    ldfa_hf.wrap(model, LDFAConfig(rule="sampled", rank=2, rule_options={"fraction": 1.0}))
    torch.testing.assert_close(input_grad(model), exact, rtol=1e-5, atol=1e-6)


def test_weight_gradients_stay_exact_and_the_draw_is_seeded():
    reference = mlp()
    input_grad(reference)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(reference)
        model.zero_grad()
        ldfa_hf.wrap(model, LDFAConfig(rule="sampled", rank=2))
        runs.append(input_grad(model))
        # the last layer's weight gradient is exact (its error comes from the loss directly)
        torch.testing.assert_close(model[4].weight.grad, reference[4].weight.grad)
    assert torch.equal(runs[0], runs[1])


def test_rows_sketch_reaims_the_feedback_on_a_tiny_llama():
    model = tiny_llama()
    model.train()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="sampled", rank=4))
    name = next(iter(plugin.layers))
    before = plugin.layers[name].P.clone()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    plugin.step()  # step 1 re-aims from the exact rows it saw
    assert not torch.equal(plugin.layers[name].P, before)
    assert "no exact steps" in plugin.summary(print_fn=None)


def test_bad_fraction_is_refused():
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            LDFAConfig(rule="sampled", rule_options={"fraction": bad})
    with pytest.raises(ValueError, match="reaim_every"):
        LDFAConfig(rule="sampled", rule_options={"reaim_every": 0})


def test_a_convolution_gets_plain_feedback_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.warns(ldfa_hf.LDFAWarning, match="convolution"):
        ldfa_hf.wrap(model, LDFAConfig(rule="sampled", rank=2, target_modules=["0", "2"]))
