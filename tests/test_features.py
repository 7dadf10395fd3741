"""LDFA under bf16 autocast, torch.compile, gradient checkpointing, eval / no_grad, disabled()."""

import weakref

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig

from conftest import batch_for, clone, param_grads, rel_err, tiny_gpt2, tiny_llama, tiny_vit


def enable_checkpointing(model, reentrant):
    """Hugging Face activation (gradient) checkpointing, under its current name when it has one."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _stats(plugin):
    return {n: ({k: v.clone() for k, v in h.statistics.items()}, h.pending_samples) for n, h in plugin.layers.items()}


@pytest.mark.parametrize("rule", ["local", "calibrated"])
def test_bf16_autocast_trains_and_keeps_float32_factors(rule):
    torch.manual_seed(0)
    model, batch = tiny_llama(), batch_for("llama")
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=4))
    before = {n: h.P.clone() for n, h in plugin.layers.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    plugin.step()
    for name, hook in plugin.layers.items():
        assert hook.P.dtype == torch.float32 and hook.Q.dtype == torch.float32
        assert not torch.equal(hook.P, before[name])
    assert plugin.stats()["skipped_updates"] == 0


def test_bf16_autocast_bp_rule_matches_unwrapped_autocast():
    torch.manual_seed(0)
    model, batch = tiny_vit(), batch_for("vit")
    reference = clone(model)
    ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = param_grads(model, batch)
        expected = param_grads(reference, batch)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 2e-2, key


@pytest.mark.parametrize("rule", ["local", "svd"])
def test_torch_compile_aot_eager_matches_eager(rule):
    torch.manual_seed(0)
    model, batch = tiny_gpt2(), batch_for("gpt2")
    eager = clone(model)
    compiled_plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=4))
    eager_plugin = ldfa_hf.wrap(eager, LDFAConfig(rule=rule, rank=4))
    compiled = torch.compile(model, backend="aot_eager")
    compiled(**batch).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = param_grads(eager, batch)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-5, key
    got_stats, expected_stats = _stats(compiled_plugin), _stats(eager_plugin)
    for name, (stats, samples) in expected_stats.items():
        assert got_stats[name][1] == samples
        for key in stats:
            assert rel_err(got_stats[name][0][key], stats[key]) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant, rule", [(False, "oja"), (True, "oja"), (False, "calibrated"),
                                             (True, "calibrated")])
def test_gradient_checkpointing_counts_statistics_once(reentrant, rule):
    torch.manual_seed(0)
    model, batch = tiny_llama(), batch_for("llama")
    checkpointed = clone(model)
    plain_plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=4))
    ckpt_plugin = ldfa_hf.wrap(checkpointed, LDFAConfig(rule=rule, rank=4))
    enable_checkpointing(checkpointed, reentrant)
    checkpointed.train()
    expected = param_grads(model, batch)
    got = param_grads(checkpointed, batch)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-5, key
    plain, ckpt = _stats(plain_plugin), _stats(ckpt_plugin)
    assert sum(bool(stats) for stats, _ in plain.values()) >= len(plain) - 1  # all but the embedding-fed layer
    for name, (stats, samples) in plain.items():
        assert ckpt[name][1] == samples, name  # counted once, not once per forward
        for key in stats:
            assert rel_err(ckpt[name][0][key], stats[key]) < 1e-5


def test_no_grad_inference_adds_nothing():
    torch.manual_seed(0)
    model, batch = tiny_llama(), batch_for("llama")
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="local", rank=4))
    ids = batch["input_ids"].clone()
    alive = weakref.ref(ids)
    with torch.no_grad():
        out = model(input_ids=ids)
    del ids
    assert out.logits.grad_fn is None
    assert alive() is None  # nothing kept a reference to the inputs
    assert all(h.pending_samples == 0 and not h.statistics for h in plugin.layers.values())


def test_eval_mode_gathers_no_statistics_but_keeps_feedback():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="local", rank=2))
    layer.eval()
    x = torch.randn(3, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x)
    hook = plugin.layers[""]
    assert hook.pending_samples == 0 and not hook.statistics
    assert rel_err(gx, torch.ones(3, 5) @ hook.P @ hook.Q) < 1e-6


def test_disabled_is_exact_backprop_and_reenables():
    torch.manual_seed(0)
    model, batch = tiny_vit(), batch_for("vit")
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="fixed", rank=2))
    with plugin.disabled():
        got = param_grads(model, batch)
    expected = param_grads(reference, batch)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert any(rel_err(v, expected[k]) > 1e-3 for k, v in param_grads(model, batch).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_factors_follow_the_module_device():
    layer = nn.Linear(4, 3)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="local", rank=2))
    layer.cuda()
    x = torch.randn(5, 4, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    plugin.step()
    view = plugin.layers[""]
    assert view.P.device.type == "cuda" and view.Q.device.type == "cuda" and view.skipped == 0


def test_gradient_accumulation_sums_statistics():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="local", rank=2))
    x = torch.randn(8, 6, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    whole = _stats(plugin)[""]
    plugin.reset_statistics()
    for part in x.split(4):
        (layer(part) ** 2).sum().backward()
    halves = _stats(plugin)[""]
    assert halves[1] == whole[1] == 8
    for key in whole[0]:
        assert rel_err(halves[0][key], whole[0][key]) < 1e-5


def test_dfa_under_gradient_checkpointing_matches_plain():
    torch.manual_seed(0)
    model, batch = tiny_llama(), batch_for("llama")
    checkpointed = clone(model)
    ldfa_hf.wrap(model, LDFAConfig(rule="dfa"))
    ldfa_hf.wrap(checkpointed, LDFAConfig(rule="dfa"))
    enable_checkpointing(checkpointed, False)
    checkpointed.train()
    expected, got = param_grads(model, batch), param_grads(checkpointed, batch)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-5, key


def _compile_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


def _input_grad(model, x):
    x = x.detach().clone().requires_grad_(True)
    model(x).sum().backward()
    return x.grad


def test_torch_compile_sees_hooks_added_and_removed_after_compiling():
    """Dynamo does not guard module hooks by default: a graph compiled without LDFA (another
    model of the same structure, or this one before wrapping) must not be reused with LDFA on."""
    x = torch.randn(4, 16)
    exact = _input_grad(_compile_model(), x)
    eager = _compile_model()
    ldfa_hf.wrap(eager, LDFAConfig(rank=2))
    expected = _input_grad(eager, x)
    assert not torch.allclose(expected, exact)
    plain = torch.compile(_compile_model(), backend="aot_eager")
    torch.testing.assert_close(_input_grad(plain, x), exact)  # compiled before any LDFA model exists
    model = _compile_model()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(_input_grad(compiled, x), exact)  # this one too, still unwrapped
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    torch.testing.assert_close(_input_grad(compiled, x), expected)
    other = _compile_model()
    ldfa_hf.wrap(other, LDFAConfig(rank=2))
    torch.testing.assert_close(_input_grad(torch.compile(other, backend="aot_eager"), x), expected)
    plugin.detach()
    torch.testing.assert_close(_input_grad(compiled, x), exact)


def test_a_training_step_in_eval_mode_warns_when_the_rule_needs_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()  # as from_pretrained returns it
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2))
    model(torch.randn(4, 6)).sum().backward()
    with pytest.warns(ldfa_hf.LDFAWarning, match="forward ran in eval mode.*call model.train"):
        plugin.step()
    model.train()
    model(torch.randn(4, 6)).sum().backward()
    plugin.step()  # no second warning, and training mode gathers statistics again
    svd = ldfa_hf.wrap(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval(), LDFAConfig(rank=2))
    svd.model(torch.randn(4, 6)).sum().backward()
    svd.step()  # svd gathers nothing: eval mode changes nothing for it, so no warning
