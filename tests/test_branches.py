"""Residual-branch skipping (``skip_branches``, ``branch_bridge``): where the branches are, what a
skipped or bridged branch sends down (against autograd on a model with the same cut made by
hand), the allocation and its seeded draw, the state, and a clean detach."""

import copy

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig, allocation
from ldfa_hf.branch_hook import fit_bridge
from ldfa_hf.branches import BRANCH_MAPPINGS, find_branches


def tiny_llama(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32))


def tiny(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    if family == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=64))
    if family == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64, num_labels=3))
    if family in ("roberta", "electra", "deberta-v2"):
        config = {"roberta": tf.RobertaConfig, "electra": tf.ElectraConfig, "deberta-v2": tf.DebertaV2Config}[family]
        model_class = {"roberta": tf.RobertaForSequenceClassification, "electra": tf.ElectraForSequenceClassification,
                       "deberta-v2": tf.DebertaV2ForSequenceClassification}[family]
        return model_class(config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, **(
                                      {"embedding_size": 32} if family == "electra" else {})))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64,
                                                      max_position_embeddings=32))
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                              num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32,
                                              dropout=0.0))  # OPT's dropout is functional
    return tiny_llama(2)


FAMILIES = ["llama", "gpt2", "bert", "vit", "roberta", "electra", "deberta-v2", "gpt_neox", "opt"]


def inputs(family, seed=0):
    """A batch with a loss for the family's tiny model: causal LM, sequence classifier or image classifier."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator), "labels": torch.tensor([0, 2])}
    ids = torch.randint(3, 64, (2, 10), generator=generator)
    if family in ("bert", "roberta", "electra", "deberta-v2"):
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": ids}


def batch(seed=0):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def assert_same_grads(got, expected, atol=1e-7):
    """Every parameter's gradient as expected: none where none is expected, else equal."""
    assert got.keys() == expected.keys()
    for name in expected:
        if expected[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=atol, msg=name)


def no_hooks_left(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_family_has_its_two_branches_per_block(family):
    model = tiny(family)
    branches = find_branches(model)
    assert [b.role for b in branches] == ["attention", "mlp"] * 2
    assert [b.depth for b in branches] == [0, 0, 1, 1]
    assert all(b.input_module is not b.output_module for b in branches)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_measures_its_branches_and_skips_them_as_a_cut_by_hand(family):
    """Exact: autograd's gradients, and every branch's input tap pairs with its output tap (a gain is
    measured, so the input module really is where the branch starts). Skipped: the gradients of the
    same model with that branch's output detached by hand, and its own weights get none."""
    reference, model = tiny(family), tiny(family)
    model.load_state_dict(reference.state_dict())
    for m in (reference, model):  # training mode, dropout off: both deterministic
        m.train()
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5))
    reference(**inputs(family)).loss.backward()
    model(**inputs(family)).loss.backward()
    assert_same_grads(grads(model), grads(reference), atol=1e-6)
    plugin.step()
    assert all(b.gain > 0 for b in plugin.branches.values()), {n: b.gain for n, b in plugin.branches.items()}
    reference.zero_grad(set_to_none=True), model.zero_grad(set_to_none=True)
    bottom_mlp = [n for n in plugin.branches if plugin.branches[n].depth == 0 and plugin.branches[n].role == "mlp"]
    _force(plugin, ["exact", "skip", "exact", "exact"])
    _cut_by_hand(reference, set(bottom_mlp))
    reference(**inputs(family)).loss.backward()
    model(**inputs(family)).loss.backward()
    assert_same_grads(grads(model), grads(reference), atol=1e-6)
    skipped = plugin._branches[bottom_mlp[0]].branch.output_module
    assert all(p.grad is None for p in skipped.parameters())
    plugin.detach()
    assert no_hooks_left(model)


def test_peft_wrapped_model_finds_the_same_branches():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(2), LoraConfig(r=2, target_modules="all-linear"))
    names = [b.name for b in find_branches(model)]
    assert names == [f"base_model.model.model.layers.{i}.{role}" for i in range(2) for role in ("attention", "mlp")]


def test_unknown_family_is_a_clear_error_and_the_model_is_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="model_type None.*branch_map"):
        ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5))
    assert no_hooks_left(model)
    bad_map = {"blocks": r"layers\.\d+", "branches": {"attention": ["input_layernorm", "no_such_module"]}}
    llama = tiny_llama(2)
    with pytest.raises(ValueError, match="no_such_module"):
        ldfa_hf.wrap(llama, LDFAConfig(rule="bp", skip_branches=0.5, branch_map=bad_map))
    assert no_hooks_left(llama)


def test_a_user_branch_map_names_branches_for_any_model():
    mapping = {"blocks": r"layers\.\d+", "branches": {"mlp": ["post_attention_layernorm", "mlp"]}}
    assert [b.name for b in find_branches(tiny_llama(2), mapping)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "llama" in BRANCH_MAPPINGS and "gpt2" in BRANCH_MAPPINGS


@pytest.mark.parametrize("value, match", [(1.0, "skip_branches"), (-0.1, "skip_branches"),
                                          (True, "skip_branches")])
def test_bad_skip_share_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        LDFAConfig(skip_branches=value)


def test_bad_branch_settings_are_refused():
    with pytest.raises(ValueError, match="branch_bridge"):
        LDFAConfig(branch_bridge=-1)
    with pytest.raises(ValueError, match="branch_allocation"):
        LDFAConfig(branch_allocation="random")
    with pytest.raises(ValueError, match="branch_map"):
        LDFAConfig(branch_map={"blocks": "("})
    with pytest.raises(ValueError, match="branch_unbiased needs one coin per branch"):
        LDFAConfig(rule="bp", skip_branches=0.5, branch_allocation="cut", branch_unbiased=True)


def _force(plugin, modes):
    for hook, mode in zip(plugin._branches.values(), modes):
        hook.mode = mode


def _cut_by_hand(model, which):
    """Reference: the same branches' outputs detached with plain forward hooks."""
    handles = []
    for b in [b for b in find_branches(model) if b.name in which]:
        def detach(module, args, output):
            return (output[0].detach(), *output[1:]) if isinstance(output, tuple) else output.detach()
        handles.append(b.output_module.register_forward_hook(detach))
    return handles


def test_exact_branches_with_taps_give_autograd_gradients():
    reference, model = tiny_llama(), tiny_llama()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_bridge=4))
    assert all(b.mode == "exact" for b in plugin.branches.values())  # unmeasured: the first step is exact
    reference(**batch()).loss.backward()
    model(**batch()).loss.backward()
    expected, got = grads(reference), grads(model)
    assert all(g is not None for g in expected.values())
    assert_same_grads(got, expected)
    assert all(b.exact_backwards == 1 and b.gain != b.gain for b in plugin.branches.values())  # NaN: pooled at step()
    plugin.step()
    assert all(b.gain > 0 for b in plugin.branches.values())


def test_skipped_branch_sends_nothing_and_its_adapters_rest():
    reference, model = tiny_llama(), tiny_llama()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5))
    names = list(plugin.branches)
    modes = ["exact", "skip", "skip", "exact", "exact", "skip"]
    _force(plugin, modes)
    _cut_by_hand(reference, {n for n, m in zip(names, modes) if m == "skip"})
    reference(**batch()).loss.backward()
    model(**batch()).loss.backward()
    assert_same_grads(grads(model), grads(reference))
    assert model.model.layers[0].mlp.up_proj.weight.grad is None  # block 0's MLP ran no backward
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_bridged_branch_sends_its_input_the_low_rank_error():
    """A bridged branch adds ``(δ P) Q`` to its input's error: reproduced by hand with a hook that
    adds the same linear map on a model whose branch is detached."""
    reference, model = tiny_llama(2), tiny_llama(2)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_bridge=4))
    hook = plugin._branches["model.layers.1.mlp"]
    torch.manual_seed(1)
    hook.P, hook.Q = torch.randn(32, 4), torch.randn(4, 32)
    _force(plugin, ["exact", "exact", "exact", "bridge"])
    layer = reference.model.layers[1]
    P, Q = hook.P.clone(), hook.Q.clone()

    class Bridge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, x):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return None, (g @ P) @ Q

    saved = {}
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: saved.update(x=a[0]))
    layer.mlp.register_forward_hook(lambda m, a, out: Bridge.apply(out.detach(), saved["x"]))
    reference(**batch()).loss.backward()
    model(**batch()).loss.backward()
    assert_same_grads(grads(model), grads(reference), atol=1e-6)
    assert model.model.layers[1].mlp.down_proj.weight.grad is None


def test_bridge_fit_recovers_a_low_rank_linear_map():
    torch.manual_seed(0)
    d, r = 24, 3
    A = torch.randn(d, r) @ torch.randn(r, d)
    g = torch.randn(500, d)
    noise = 0.01 * torch.randn(500, d)
    P, Q = fit_bridge({"oo": g.T @ g, "oi": g.T @ (g @ A + noise)}, r)
    assert P.shape == (d, r) and Q.shape == (r, d)
    assert torch.linalg.norm(P @ Q - A) / torch.linalg.norm(A) < 0.01
    assert fit_bridge({"out2": torch.ones(())}, r) is None


def test_rates_average_the_share_and_respect_the_cap():
    gain = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.6])
    rates = allocation.sensitivity_rates(gain, 0.4)
    assert abs(float(rates.mean()) - 0.4) < 1e-6
    assert float(rates.max()) <= allocation.MAX_SKIP + 1e-12
    assert torch.all(rates[:-1] >= rates[1:])  # a smaller gain skips more often
    depth = allocation.depth_rates(torch.arange(6), 0.3)
    assert abs(float(depth.mean()) - 0.3) < 1e-6 and float(depth[-1]) == 0.0
    assert torch.equal(allocation.uniform_rates(4, 0.25), torch.full((4,), 0.25, dtype=torch.float64))
    unmeasured = allocation.sensitivity_rates(torch.tensor([1.0, float("nan"), 0.5]), 0.3)
    assert float(unmeasured[1]) == 0.0 and abs(float(unmeasured.mean()) - 0.3) < 1e-6
    silent = allocation.sensitivity_rates(torch.tensor([1.0, 0.0, 0.5]), 0.3)  # sends nothing down: skipped most
    assert float(silent[1]) == allocation.MAX_SKIP


def test_draw_hits_each_rate_with_a_steady_count_and_repeats_for_the_same_step():
    rates = torch.tensor([0.75, 0.5, 0.1, 0.0, 0.3, 0.35], dtype=torch.float64)
    masks = torch.stack([allocation.draw(rates, seed=3, step=s) for s in range(4000)]).double()
    assert torch.allclose(masks.mean(0), rates, atol=0.03)
    counts = masks.sum(1)
    assert set(counts.tolist()) <= {2.0, 3.0}  # Σ rates = 2.0: never fewer than 2 or more than 3
    assert torch.equal(allocation.draw(rates, 3, 17), allocation.draw(rates, 3, 17))
    assert any(not torch.equal(allocation.draw(rates, 3, s), allocation.draw(rates, 4, s)) for s in range(20))
    coins = torch.stack([allocation.draw(rates, 3, s, independent=True) for s in range(4000)]).double()
    assert torch.allclose(coins.mean(0), rates, atol=0.03) and len(set(coins.sum(1).tolist())) > 2
    high = torch.full((3,), 0.99, dtype=torch.float64)  # never every branch: the loss would train nothing
    assert not any(bool(allocation.draw(high, 0, s, independent=True).all()) for s in range(200))


def _train(model, plugin, steps, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    modes = []
    for step in range(start, steps):
        modes.append(tuple(b.mode for b in plugin.branches.values()))
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        plugin.step()
    return opt, modes


def test_state_round_trip_repeats_the_draws_and_the_bridge(tmp_path):
    config = LDFAConfig(rule="bp", skip_branches=0.5, branch_bridge=4, seed=5)
    model = tiny_llama()
    plugin = ldfa_hf.wrap(model, config)
    _, modes = _train(model, plugin, 6)
    assert any("bridge" in m for m in modes) and all(m == ("exact",) * 6 for m in modes[:1])
    plugin.save_pretrained(tmp_path)
    clone = copy.deepcopy(model)
    again = ldfa_hf.LDFAPlugin.from_pretrained(tmp_path, clone)
    assert {n: b.mode for n, b in again.branches.items()} == {n: b.mode for n, b in plugin.branches.items()}
    assert torch.equal(again.branch_rates(), plugin.branch_rates())
    for name, view in plugin.branches.items():
        assert torch.equal(again.branches[name].P, view.P), name
    wrong = {**plugin.state_dict(), "__branch__.model.layers.9.mlp.out2": torch.ones(())}
    with pytest.raises(ValueError, match="no such residual branch"):
        again.load_state_dict(wrong)


def test_detach_leaves_nothing_and_eval_forward_is_untouched():
    model = tiny_llama(2)
    reference = copy.deepcopy(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5))
    _force(plugin, ["skip"] * 4)
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, reference(**batch()).logits)
    plugin.detach()
    assert no_hooks_left(model)
    model(**batch()).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bottom_branch_of_a_lora_model_is_measured_and_skips_most():
    """Under LoRA the embeddings are frozen, so the bottom attention branch's input needs no
    gradient: it sends nothing down (gain 0) and is skipped at the cap once measured."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(3), LoraConfig(r=2, target_modules="all-linear"))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.3))
    _train(model, plugin, 1)
    views = list(plugin.branches.values())
    assert views[0].gain == 0 and all(v.gain > 0 for v in views[1:])
    assert views[0].rate == allocation.MAX_SKIP and abs(sum(v.rate for v in views) / len(views) - 0.3) < 1e-6


def test_a_learning_tail_trains_the_output_projection_of_a_skipped_branch():
    """branch_tail: the skipped MLP's down_proj adapters get exactly the gradient they would get with
    their input detached by hand; gate/up get none, and nothing goes below the branch."""
    from peft import LoraConfig, get_peft_model

    def lora(seed):
        model = get_peft_model(tiny_llama(2), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        return model

    reference, model = lora(0), lora(0)
    model.load_state_dict(reference.state_dict())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_tail=True))
    _force(plugin, ["exact", "skip", "exact", "exact"])
    down = reference.base_model.model.model.layers[0].mlp.down_proj
    down.register_forward_pre_hook(lambda m, a: (a[0].detach(),))
    reference(**batch()).loss.backward()
    model(**batch()).loss.backward()
    assert_same_grads(grads(model), grads(reference))
    mlp = model.base_model.model.model.layers[0].mlp
    assert mlp.down_proj.lora_B.default.weight.grad is not None
    assert mlp.up_proj.lora_A.default.weight.grad is None


def test_bottom_allocation_is_a_fixed_cut_whose_tails_learn():
    """branch_allocation="bottom": the bottom share of the branches skips on every step (the same
    draw whatever the seed or step); with tails their output projections still train, from the
    error the residual stream carries down: the same gradients as a cut made by hand."""
    from peft import LoraConfig, get_peft_model

    rates = allocation.bottom_rates(6, 0.5)
    assert rates.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(allocation.draw(rates, seed, step).tolist() == [True] * 3 + [False] * 3
               for seed in (0, 7) for step in range(50))

    def lora():
        return get_peft_model(tiny_llama(3), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))

    reference, model = lora(), lora()
    model.load_state_dict(reference.state_dict())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_allocation="bottom", branch_tail=True))
    assert [b.mode for b in plugin.branches.values()] == ["skip"] * 3 + ["exact"] * 3
    skipped = {n for n, b in plugin.branches.items() if b.mode == "skip"}
    layers = reference.base_model.model.model.layers
    for block, role in [(0, "attention"), (0, "mlp"), (1, "attention")]:
        branch = layers[block].self_attn if role == "attention" else layers[block].mlp
        tail = branch.o_proj if role == "attention" else branch.down_proj
        tail.register_forward_pre_hook(lambda m, a: (a[0].detach(),))
    assert {f"base_model.model.model.layers.{b}.{r}" for b, r in [(0, "attention"), (0, "mlp"), (1, "attention")]} == skipped
    reference(**batch()).loss.backward()
    model(**batch()).loss.backward()
    assert_same_grads(grads(model), grads(reference))
    bottom = model.base_model.model.model.layers[0]
    assert bottom.self_attn.o_proj.lora_B.default.weight.grad is not None
    assert bottom.self_attn.q_proj.lora_A.default.weight.grad is None
    assert bottom.mlp.gate_proj.lora_A.default.weight.grad is None
    plugin.step()
    assert [b.mode for b in plugin.branches.values()] == ["skip"] * 3 + ["exact"] * 3


def test_random_cut_skips_a_bottom_prefix_at_its_rates_the_same_for_a_seed_and_step():
    """branch_allocation="cut": each step the skipped branches are the bottom c, c uniform over a
    range averaging the share and never all; each branch skips at the rate the plugin reports."""
    for n, share in [(60, 0.5), (60, 0.33), (6, 0.5), (60, 0.8)]:
        lo, hi = allocation.cut_bounds(n, share)
        assert 0 <= lo <= hi < n and abs((lo + hi) / 2 - share * n) <= 0.5
        rates = allocation.cut_rates(lo, hi, n)
        assert abs(float(rates.mean()) - (lo + hi) / 2 / n) < 1e-9 and torch.all(rates[:-1] >= rates[1:])
    assert allocation.cut_bounds(60, 0.5) == (16, 44)  # the middle half of the widest range, (1, 59)
    assert allocation.cut_bounds(60, 0.5, width=1.0) == (1, 59)
    assert allocation.cut_bounds(60, 0.5, width=0.0) == (30, 30)  # width 0: the fixed bottom cut
    lo, hi = allocation.cut_bounds(6, 0.5)
    masks = torch.stack([allocation.draw_cut(lo, hi, 6, seed=2, step=s) for s in range(3000)])
    for mask in masks:  # a prefix: once one branch runs exact, every branch above does
        count = int(mask.sum())
        assert mask[:count].all() and not mask[count:].any() and lo <= count <= hi
    assert torch.allclose(masks.double().mean(0), allocation.cut_rates(lo, hi, 6), atol=0.03)
    assert torch.equal(allocation.draw_cut(lo, hi, 6, 2, 9), allocation.draw_cut(lo, hi, 6, 2, 9))

    model = tiny_llama(3)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_allocation="cut", seed=2))
    assert plugin.cut_bounds() == (lo, hi)
    _, modes = _train(model, plugin, 12)
    assert modes == [tuple("skip" if x else "exact" for x in allocation.draw_cut(lo, hi, 6, 2, s)) for s in range(12)]
    assert len(set(modes)) > 1
    assert [round(b.rate, 6) for b in plugin.branches.values()] == [round(r, 6) for r in allocation.cut_rates(lo, hi, 6).tolist()]


def test_random_cut_gives_the_gradients_of_the_same_cut_made_by_hand():
    """The step's cut, with tails learning, against a LoRA model whose same branches are detached by
    hand (input side) and whose tails keep their output error."""
    from peft import LoraConfig, get_peft_model

    def lora():
        return get_peft_model(tiny_llama(3), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))

    model = lora()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_allocation="cut", branch_tail=True))
    for step in range(6):
        reference = lora()
        reference.load_state_dict(model.state_dict())
        skipped = [b for b in plugin.branches.values() if b.mode == "skip"]
        layers = reference.base_model.model.model.layers
        for b in skipped:
            branch = layers[b.depth].self_attn if b.role == "attention" else layers[b.depth].mlp
            tail = branch.o_proj if b.role == "attention" else branch.down_proj
            tail.register_forward_pre_hook(lambda m, a: (a[0].detach(),))
        model.zero_grad(set_to_none=True)
        reference(**batch(step)).loss.backward()
        model(**batch(step)).loss.backward()
        assert_same_grads(grads(model), grads(reference))
        plugin.step()


def test_unbiased_branches_average_to_backprops_input_error():
    """branch_unbiased: over the draws, the error reaching the embeddings' output equals autograd's
    (an exact branch sends 1/(1-p) of its input error, a skipped one none)."""
    reference, model = tiny_llama(2), tiny_llama(2)
    emb_ref, emb = reference.model.embed_tokens, model.model.embed_tokens
    for e in (emb_ref, emb):
        e.register_forward_hook(lambda m, a, out: out.retain_grad() or out)
    captured = {}
    emb.register_forward_hook(lambda m, a, out: captured.__setitem__("x", out))
    emb_ref.register_forward_hook(lambda m, a, out: captured.__setitem__("ref", out))
    reference(**batch()).loss.backward()
    target = captured["ref"].grad.clone()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_allocation="uniform",
                                            branch_unbiased=True))
    total, draws = torch.zeros_like(target), 400
    for step in range(draws):
        plugin.num_steps = step
        plugin._schedule()
        model.zero_grad(set_to_none=True)
        model(**batch()).loss.backward()
        total += captured["x"].grad
    one = captured["x"].grad
    mean = total / draws
    assert (mean - target).norm() / target.norm() < 0.1
    assert (one - target).norm() / target.norm() > 0.1  # a single draw is not backprop's
