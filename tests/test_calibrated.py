"""The ``calibrated`` rule: exact calibration steps that aim P at the errors each layer receives."""

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.linalg import top_subspace

from conftest import batch_for, clone, layer_input_grads, param_grads, rel_err, tiny_bert


def test_top_subspace_recovers_a_low_rank_covariance_from_its_sketch():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(200, 5, generator=g)).Q
    errors = torch.randn(300, 5, generator=g) @ basis.T          # rank-5 errors in R^200
    omega = torch.linalg.qr(torch.randn(200, 12, generator=g)).Q
    P, values = top_subspace(errors.T @ (errors @ omega), omega, 5)
    assert P.shape == (200, 5)
    assert torch.allclose(P.T @ P, torch.eye(5), atol=1e-5)
    assert rel_err(P @ (P.T @ basis), basis) < 1e-5             # same subspace
    expected = torch.linalg.eigvalsh(errors.T @ errors)[-5:].flip(0)
    assert torch.allclose(values, expected, rtol=1e-4)


def test_top_subspace_picks_the_largest_directions_of_a_full_rank_covariance():
    g = torch.Generator().manual_seed(1)
    scales = torch.cat([torch.tensor([30.0, 20.0, 10.0]), torch.full((97,), 0.1)])
    errors = torch.randn(2000, 100, generator=g) * scales
    omega = torch.linalg.qr(torch.randn(100, 14, generator=g)).Q
    P, _ = top_subspace(errors.T @ (errors @ omega), omega, 3)
    assert torch.allclose(P.abs().max(0).values, torch.ones(3), atol=1e-2)  # the three leading axes
    assert set(P.abs().argmax(0).tolist()) == {0, 1, 2}


def linear_chain():
    """No nonlinearity: every hidden layer's output error is the head's error through fixed maps,
    so it has rank ≤ the number of classes (3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.Linear(40, 30), nn.Linear(30, 3))


def _grads(model, x, y, names):
    """Cross-entropy gradient at each named layer's input."""
    modules = dict(model.named_modules())
    seen, handles = {}, []
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0]), prepend=True))
    try:
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [seen[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    return dict(zip(names, grads))


@pytest.mark.parametrize("subspace", ["input", "output"])
@pytest.mark.parametrize("rank", [3, 5])
def test_errors_of_rank_at_most_r_give_backprops_input_gradient_after_calibration(rank, subspace):
    model = linear_chain()
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=rank, calibrate_every=4,
                                            rule_options={"subspace": subspace}))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    before = {n: v.P.clone() for n, v in plugin.layers.items()}
    nn.functional.cross_entropy(model(x), y).backward()      # the calibration step
    plugin.step()
    assert any(not torch.equal(before[n], v.P) for n, v in plugin.layers.items())
    names = ["1", "2"]
    got, expected = _grads(model, x, y, names), _grads(reference, x, y, names)
    for name in names:
        assert rel_err(got[name], expected[name]) <= 1e-5, name
    # a new batch: the errors still live in the same rank-3 space, so the feedback stays exact
    x2, y2 = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    got, expected = _grads(model, x2, y2, names), _grads(reference, x2, y2, names)
    for name in names:
        assert rel_err(got[name], expected[name]) <= 1e-5, name


def test_calibration_sets_p_to_w_v_with_orthonormal_q():
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert", size=4)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=4))
    before = {n: v.Q.clone() for n, v in plugin.layers.items()}
    model(**batch).loss.backward()
    plugin.step()
    for name, view in plugin.layers.items():
        W = view.module.weight.detach()
        assert torch.allclose(view.Q @ view.Q.T, torch.eye(view.rank), atol=1e-5), name  # Q = Vᵀ
        assert torch.allclose(view.P, W @ view.Q.T, atol=1e-5), name                      # P = W V
    assert sum(not torch.equal(before[n], v.Q) for n, v in plugin.layers.items()) >= len(before) - 1


def test_output_subspace_switch_sets_q_to_p_transpose_w_with_orthonormal_p():
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert", size=4)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=4, rule_options={"subspace": "output"}))
    model(**batch).loss.backward()
    plugin.step()
    for name, view in plugin.layers.items():
        W = view.module.weight.detach()
        assert torch.allclose(view.P.T @ view.P, torch.eye(view.rank), atol=1e-5), name
        assert torch.allclose(view.Q, view.P.T @ W, atol=1e-5), name


def test_calibration_steps_are_exact_backprop_and_follow_the_schedule(hf_model):
    name, model, batch = hf_model
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2, calibrate_every=3))
    names = list(plugin.targets)
    schedule = []
    for step in range(4):
        schedule.append(plugin.rule.calibrating)
        expected = layer_input_grads(reference, names, batch)
        got = layer_input_grads(model, names, batch)
        errors = [rel_err(got[n], expected[n]) for n in expected]
        if schedule[-1]:
            assert max(errors) <= 1e-5
        else:
            assert max(errors) > 1e-3  # rank 2 is not exact for these layers
        plugin.reset_statistics()
        plugin.step()
    assert schedule == [True, False, False, True]


@pytest.mark.parametrize("rule", ["calibrated"])
def test_weight_and_bias_gradients_stay_exact_between_calibrations(rule):
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert")
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule=rule, rank=2, calibrate_every=10))
    model(**batch).loss.backward()
    plugin.step()
    model.zero_grad()
    # δᵀx with the error LDFA delivers: compare against each layer's own autograd on its recorded tensors
    modules = dict(model.named_modules())
    seen = {}
    handles = []
    for layer in plugin.targets:
        def record(module, args, output, layer=layer):
            seen[layer] = [args[0].detach()]
            output.register_hook(lambda g: seen[layer].append(g))
        handles.append(modules[layer].register_forward_hook(record))
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    checked = 0
    for layer, record in seen.items():
        if len(record) < 2 or layer.endswith("word_embeddings"):
            continue
        x, delta = record
        expected = delta.reshape(-1, delta.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        assert rel_err(modules[layer].weight.grad, expected) < 1e-5, layer
        checked += 1
    assert checked >= 8


def test_gradient_accumulation_calibrates_on_every_micro_batch():
    torch.manual_seed(0)
    layer = nn.Linear(16, 32)
    reference = clone(layer)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="calibrated", rank=4))
    g = torch.Generator().manual_seed(0)
    # two micro-batches whose output errors span different 2-d subspaces of R^32
    directions = [torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)]
    inputs = [torch.randn(10, 16, generator=g, requires_grad=True) for _ in directions]
    errors = [torch.randn(10, 2, generator=g) @ d for d in directions]
    for x, e in zip(inputs, errors):
        (layer(x) * e).sum().backward()
    plugin.step()
    for x, e in zip(inputs, errors):
        got = torch.autograd.grad((layer(x) * e).sum(), x)[0]
        expected = torch.autograd.grad((reference(x) * e).sum(), x)[0]
        assert rel_err(got, expected) <= 1e-5

    # calibrating on the first micro-batch alone is not enough for the second
    alone = clone(reference)
    single = ldfa_hf.wrap(alone, LDFAConfig(rule="calibrated", rank=4))
    (alone(inputs[0]) * errors[0]).sum().backward()
    single.step()
    got = torch.autograd.grad((alone(inputs[1]) * errors[1]).sum(), inputs[1])[0]
    expected = torch.autograd.grad((reference(inputs[1]) * errors[1]).sum(), inputs[1])[0]
    assert rel_err(got, expected) > 0.1


def test_conv2d_low_rank_errors_are_exact_after_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1))  # errors of conv 0: rank ≤ 2
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2))
    assert plugin.targets["0"].kind == "conv2d"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 6, generator=g, requires_grad=True)
    target = torch.randn(4, 2, 6, 6, generator=g)
    ((model(x) - target) ** 2).sum().backward()
    plugin.step()
    x2 = torch.randn(4, 3, 6, 6, generator=g, requires_grad=True)
    got = torch.autograd.grad(((model(x2) - target) ** 2).sum(), x2)[0]
    expected = torch.autograd.grad(((reference(x2) - target) ** 2).sum(), x2)[0]
    assert rel_err(got, expected) <= 1e-5


def test_frozen_base_layers_calibrate_and_adapters_stay_trainable():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                             lora_dropout=0.0)
    model = peft.get_peft_model(tiny_bert(), config)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2))
    batch = batch_for("bert", size=4)
    frozen = "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer"
    before = plugin.layers[frozen].P.clone()
    model(**batch).loss.backward()
    plugin.step()
    view = plugin.layers[frozen]
    assert not view.module.weight.requires_grad
    assert not torch.equal(before, view.P)
    assert torch.allclose(view.P, view.module.weight @ view.Q.T, atol=1e-5)
    model.zero_grad()
    model(**batch).loss.backward()  # an LDFA step: adapters still receive gradients
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_non_finite_errors_on_a_calibration_step_leave_factors_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="calibrated", rank=2))
    before = (plugin.layers[""].P.clone(), plugin.layers[""].Q.clone())
    x = torch.randn(4, 6, requires_grad=True)
    poison = torch.ones(4, 5)
    poison[1, 2] = float("nan")
    (layer(x) * poison).sum().backward()
    with pytest.warns(UserWarning, match="non-finite"):
        plugin.step()
    view = plugin.layers[""]
    assert torch.equal(view.P, before[0]) and torch.equal(view.Q, before[1])
    assert view.skipped == 1 and plugin.stats()["skipped_updates"] == 1


def test_cost_counts_the_exact_calibration_steps():
    torch.manual_seed(0)
    costs = {}
    for every in (1, 4, 1000):
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=8, calibrate_every=every))
        model(torch.randn(32, 64)).sum().backward()
        costs[every] = plugin.cost()
    # every step exact (plus the sketch): costs more than backprop; rarer calibration saves more
    assert costs[1]["backward_ldfa"] > costs[1]["backward_bp"]
    assert costs[1000]["backward_saved"] > costs[4]["backward_saved"] > 0 > costs[1]["backward_saved"]
    # the saving approaches the plain LDFA step's: layers 2 and 4 save δW − N·r·(m+n)
    N = 32
    plain_saved = sum(N * m * n - N * r * (m + n) for m, n, r in [(256, 256, 8), (10, 256, 8)])
    assert costs[1000]["backward_bp"] - costs[1000]["backward_ldfa"] == pytest.approx(plain_saved, rel=0.01)


def test_resumed_plugin_calibrates_on_the_same_steps(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2, calibrate_every=3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(4):
        model(**batch_for("bert", seed=i)).loss.backward()
        optimizer.step(); optimizer.zero_grad(); plugin.step()
    plugin.save_pretrained(tmp_path)
    other = tiny_bert()
    other.load_state_dict(model.state_dict())
    restored = ldfa_hf.LDFAPlugin.from_pretrained(tmp_path, other)
    assert restored.num_steps == 4 and not restored.rule.calibrating
    for _ in range(2):
        restored.step()
    assert restored.rule.calibrating  # step 6 is a calibration step, as in the uninterrupted run


def test_param_grads_on_a_calibration_step_equal_backprop():
    torch.manual_seed(0)
    model, batch = tiny_bert(), batch_for("bert")
    reference = clone(model)
    ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2))
    expected, got = param_grads(reference, batch), param_grads(model, batch)
    for key in expected:
        assert rel_err(got[key], expected[key]) <= 1e-5, key


def test_reduced_rank_regression_is_exact_for_low_rank_errors():
    model = linear_chain()
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    plugin.step()
    view = plugin.layers["1"]
    assert torch.allclose(view.Q @ view.Q.T, torch.eye(3), atol=1e-5)            # Q = Vᵀ, orthonormal rows
    assert torch.allclose(view.P, view.module.weight @ view.Q.T, atol=1e-5)      # P = W V
    got, expected = _grads(model, x, y, ["1", "2"]), _grads(reference, x, y, ["1", "2"])
    for name in got:
        assert rel_err(got[name], expected[name]) <= 1e-5, name


def test_warmup_adds_calibrations_at_powers_of_two_below_the_interval():
    plugin = ldfa_hf.wrap(nn.Linear(4, 4), LDFAConfig(rule="calibrated", rank=2, calibrate_every=8))
    plain = [step for step in range(20) if plugin.rule.due(step)]
    warm_plugin = ldfa_hf.wrap(nn.Linear(4, 4), LDFAConfig(rule="calibrated", rank=2, calibrate_every=8,
                                                           rule_options={"warmup": True}))
    warm = [step for step in range(20) if warm_plugin.rule.due(step)]
    assert plain == [0, 8, 16] and warm == [0, 1, 2, 4, 8, 16]


def test_reduced_rank_regression_is_exact_at_full_rank_whatever_the_errors():
    """r = min(m, n) = n: V spans the whole input space, so P Q = W V Vᵀ = W."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = clone(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=8))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    plugin.step()
    x2 = torch.randn(64, 6, generator=g)
    got, expected = _grads(model, x2, y, ["2", "4"]), _grads(reference, x2, y, ["2", "4"])
    for name in got:
        assert rel_err(got[name], expected[name]) <= 1e-5, name


def test_memory_switch_pools_calibrations_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=2, calibrate_every=2,
                                            rule_options={"memory": 0.5}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(model, plugin, optimizer, steps, start):
        for i in range(start, start + steps):
            model(**batch_for("bert", seed=i)).loss.backward()
            optimizer.step(); optimizer.zero_grad(); plugin.step()

    train(model, plugin, optimizer, 3, 0)
    name = "bert.encoder.layer.1.output.dense"
    state = plugin.state_dict()
    assert f"{name}.memory" in state  # two calibrations pooled so far (steps 0 and 2)
    other = tiny_bert()
    other.load_state_dict(model.state_dict())
    restored = ldfa_hf.LDFAPlugin(plugin.config).attach(other)  # the option travels in the config
    restored.load_state_dict(state)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    train(model, plugin, optimizer, 3, 3)
    train(other, restored, other_optimizer, 3, 3)
    for key, value in plugin.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_a_head_with_fewer_classes_than_the_rank_gets_exact_feedback():
    """Cross-entropy errors of c classes have rank c − 1; the head's feedback is still W itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 4))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="calibrated", rank=8))
    g = torch.Generator().manual_seed(0)
    nn.functional.cross_entropy(model(torch.randn(32, 12, generator=g)), torch.randint(0, 4, (32,), generator=g)).backward()
    plugin.step()
    head = plugin.layers["2"]
    assert head.rank == 4 and torch.allclose(head.P @ head.Q, model[2].weight, atol=1e-5)
