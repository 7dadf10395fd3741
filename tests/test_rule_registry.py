"""The Rule contract from a user's side: a rule in their own file, registered, configured, saved, loaded."""

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig, LDFAPlugin, Rule, register_rule
from ldfa_hf.rules import SVD


class ScaledSVD(SVD):
    """A user's variant of a built-in rule: svd feedback, scaled by an option."""

    name = "scaled_svd_test"
    options = {"scale": 1.0}

    def input_grad(self, layer, g, x, x_shape, need_gx, collect):
        gx = super().input_grad(layer, g, x, x_shape, need_gx, collect)
        return None if gx is None else gx * self.options["scale"]


class CountingRule(Rule):
    """A rule from scratch: fixed factors, counts the samples it saw in a per-layer state it saves."""

    name = "counting_test"
    state_keys = ("seen",)

    def update(self, layers, step, refreshing=False):
        for layer in layers:
            layer.state["seen"] = layer.state.get("seen", torch.zeros(())) + layer.samples

    def collects(self, layer):
        return True

    def statistics(self, layer, g, z, x):
        return {}


register_rule(ScaledSVD)
register_rule(CountingRule)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def input_grad(m, plugin=None):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    m(x).sum().backward()
    return x.grad


def test_a_registered_subclass_of_a_builtin_rule_trains_and_round_trips(tmp_path):
    m = model()
    base = model()
    plain = ldfa_hf.wrap(base, LDFAConfig(rule="svd", rank=2))
    plugin = ldfa_hf.wrap(m, LDFAConfig(rule="scaled_svd_test", rank=2, rule_options={"scale": 0.5}))
    assert isinstance(plugin.rule, ScaledSVD) and plugin.rule.options == {"scale": 0.5}
    assert torch.allclose(input_grad(m), 0.5**3 * input_grad(base), atol=1e-7)  # halved at each of 3 layers
    plugin.step()
    plugin.save_pretrained(tmp_path)
    other = model()
    other.load_state_dict(m.state_dict())
    restored = LDFAPlugin.from_pretrained(tmp_path, other)
    assert restored.config.rule == "scaled_svd_test" and restored.rule.options == {"scale": 0.5}
    assert restored.state_dict().keys() == plugin.state_dict().keys()
    for key, value in plugin.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    plain.detach()


def test_a_rule_from_scratch_keeps_its_per_layer_state_in_checkpoints(tmp_path):
    m = model()
    plugin = ldfa_hf.wrap(m, LDFAConfig(rule="counting_test", rank=2))
    input_grad(m)
    plugin.step()
    state = plugin.state_dict()
    assert float(state["2.seen"]) == 5 and float(state["4.seen"]) == 5
    plugin.save_pretrained(tmp_path)
    other = model()
    restored = LDFAPlugin.from_pretrained(tmp_path, other)
    assert float(restored.state_dict()["4.seen"]) == 5


def test_unknown_rules_and_options_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="got 'nope' .a rule of your own needs ldfa_hf.register_rule first"):
        LDFAConfig(rule="nope")
    with pytest.raises(ValueError, match=r"does not take rule_options \['scal'\]; allowed: scale"):
        LDFAConfig(rule="scaled_svd_test", rule_options={"scal": 2})
    with pytest.raises(ValueError, match="allowed: memory, subspace, warmup"):
        LDFAConfig(rule="calibrated", rule_options={"memroy": 0.5})
    with pytest.raises(ValueError, match="must be like"):
        LDFAConfig(rule="calibrated", rule_options={"warmup": "yes"})
    with pytest.raises(ValueError, match="already registered"):
        register_rule(type("Other", (Rule,), {"name": "svd"}))
    with pytest.raises(TypeError, match="subclass of ldfa_hf.Rule"):
        register_rule(object)


def test_settings_a_rule_ignores_are_said():
    with pytest.warns(ldfa_hf.LDFAWarning, match="rule='svd' ignores calibrate_every=3"):
        LDFAConfig(rule="svd", calibrate_every=3)


def test_for_finetuning_is_a_valid_config_and_takes_overrides():
    cfg = LDFAConfig.for_finetuning()
    assert (cfg.rule, cfg.exact_top, cfg.skip_branches, cfg.branch_allocation, cfg.branch_tail) == (
        "bp", 2 / 3, 1 / 3, "bottom", True)
    half = LDFAConfig.for_finetuning(skip_branches=0.5, exact_top=0.5)  # v0.3.0's
    assert (half.skip_branches, half.exact_top, half.branch_tail) == (0.5, 0.5, True)
    previous = LDFAConfig.for_finetuning(rule="sampled", rank=32, exact_top=0.67, skip_branches=0.0)  # v0.2.0's
    assert (previous.rule, previous.rank, previous.exact_top, previous.skip_branches) == ("sampled", 32, 0.67, 0.0)
    with pytest.raises(ValueError, match="rank must be a positive int; got 0"):
        LDFAConfig.for_finetuning(rank=0)
    with pytest.raises(TypeError, match="unknown settings"):
        LDFAConfig.for_finetuning(rnak=8)
    assert LDFAConfig.from_dict(cfg.to_dict()) == cfg
