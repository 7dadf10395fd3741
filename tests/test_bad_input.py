"""Bad input fails before the model is touched, with a message saying what was wrong."""

import warnings

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig

from conftest import tiny_bert, tiny_gpt2


def snapshot(model):
    return (
        [(n, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m))) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_untouched(model, before):
    after = snapshot(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])


@pytest.mark.parametrize(
    "config, error, words",
    [
        (LDFAConfig(target_modules=["does_not_exist"]), ValueError,
         "target_modules=['does_not_exist'] matched no targetable layer"),
        (LDFAConfig(target_modules=r".*nothing.*"), ValueError, "matched no targetable layer"),
        (LDFAConfig(target_modules=["word_embeddings"]), ValueError,
         "it matched only layers LDFA does not target: bert.embeddings.word_embeddings (Embedding)"),
        (LDFAConfig(exclude_modules=r".*"), ValueError, "excludes every one of the"),
        (LDFAConfig(target_modules=["query"], exclude_modules=["query"]), ValueError, "excludes every one"),
        ({"rank": 4}, TypeError, "config must be an LDFAConfig, got dict"),
    ],
)
def test_bad_targets_and_configs_leave_the_model_untouched(config, error, words):
    torch.manual_seed(0)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(error) as info:
        ldfa_hf.wrap(model, config)
    assert words in str(info.value)
    assert_untouched(model, before)


def test_no_match_error_lists_what_exists():
    model = tiny_bert()
    with pytest.raises(ValueError, match="Targetable layers are: bert.encoder.layer.0.attention.self.query"):
        ldfa_hf.wrap(model, LDFAConfig(target_modules=["qkv"]))


def test_non_module_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        ldfa_hf.wrap({"weight": torch.zeros(3)}, LDFAConfig())


def test_model_without_targetable_layers():
    with pytest.raises(ValueError, match="Embedding has no layer LDFA can target"):
        ldfa_hf.wrap(nn.Embedding(5, 3))


def test_wrapping_twice_is_refused_and_harmless():
    model = tiny_gpt2()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already wrapped with LDFA .*call detach\\(\\) on the existing plugin"):
        ldfa_hf.wrap(model, LDFAConfig(rank=4))
    with pytest.raises(ValueError, match="already wrapped"):
        ldfa_hf.wrap(model.transformer.h[0], LDFAConfig(rank=4))
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="already attached"):
        plugin.attach(tiny_gpt2())
    plugin.detach()
    ldfa_hf.wrap(model, LDFAConfig(rank=4)).detach()


def test_non_finite_weight_is_refused_before_touching():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="weight of '1' contains NaN"):
        ldfa_hf.wrap(model)
    after = snapshot(model)
    assert after[0] == before[0]


def test_failure_while_registering_rolls_back(monkeypatch):
    model = tiny_bert()
    before = snapshot(model)
    from ldfa_hf import feedback

    calls = {"n": 0}
    original = feedback.FeedbackHook.register

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(self)

    monkeypatch.setattr(feedback.FeedbackHook, "register", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ldfa_hf.wrap(model)
    assert_untouched(model, before)


def test_step_on_detached_plugin():
    plugin = ldfa_hf.wrap(nn.Linear(3, 2))
    plugin.detach()
    with pytest.raises(RuntimeError, match="detached plugin"):
        plugin.step()


@pytest.mark.parametrize("rule", ["local", "oja"])
def test_non_finite_statistics_never_reach_the_factors(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=2))
    factors = {n: (h.P.clone(), h.Q.clone()) for n, h in plugin.layers.items()}
    x = torch.randn(5, 4, requires_grad=True)
    out = model(x)
    (out * torch.tensor([float("inf"), 1.0, 1.0])).sum().backward()
    with pytest.warns(UserWarning, match="non-finite feedback statistics in '0'"):
        plugin.step()
    for name, hook in plugin.layers.items():
        assert torch.equal(hook.P, factors[name][0]) and torch.equal(hook.Q, factors[name][1])
    assert plugin.stats()["skipped_updates"] == 2
    assert plugin.stats()["layers"]["1"]["skipped"] == 1
    # warned once: a second bad step is counted but silent
    model(x).sum().mul(float("nan")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plugin.step()
    assert plugin.stats()["layers"]["1"]["skipped"] == 2


def test_zero3_partitioned_weight_is_refused_at_wrap():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    before = snapshot(model)
    with pytest.raises(ValueError, match="LDFA needs the full weight of '1' outside forward, but DeepSpeed ZeRO-3"):
        ldfa_hf.wrap(model)
    assert_untouched(model, before)
    ldfa_hf.wrap(model, LDFAConfig(rule="bp")).detach()  # bp never reads W outside forward


def test_weight_sharded_after_wrap_is_refused_at_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    plugin = ldfa_hf.wrap(model)
    model[1].weight.data = torch.empty(0)  # FSDP's flat-parameter view outside forward
    with pytest.raises(ValueError, match="needs the full weight of '1' outside forward, but it is empty here"):
        plugin.step()
