"""QLoRA: bitsandbytes 4-bit base layers get LDFA feedback (de-quantised factors, no 4-bit backward)."""

import copy
import csv
import warnings

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def quantize(model: nn.Module, skip=("lm_head",)) -> nn.Module:
    """Every nn.Linear but ``skip`` becomes an nf4 ``Linear4bit`` holding the same (rounded) weight."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, child_name, q.to("cpu"))
    return model


def tiny_qlora(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = quantize(LlamaForCausalLM(config))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))


def batch(seed=0):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_4bit_base_layers_are_targeted_not_left_exact():
    model = tiny_qlora()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ldfa_hf.LDFAWarning)  # no "left exact" warning any more
        plugin = ldfa_hf.wrap(model, LDFAConfig(rank=4, rule="streaming"))
    kinds = {t.kind for t in plugin.targets.values()}
    assert "linear4bit" in kinds
    assert sum(t.kind == "linear4bit" for t in plugin.targets.values()) == 14  # 7 per block, 2 blocks
    name = next(n for n, t in plugin.targets.items() if t.kind == "linear4bit")
    view = plugin.layers[name]
    W = bnb.functional.dequantize_4bit(view.module.weight.data, view.module.weight.quant_state)
    assert view.shape == tuple(W.shape) and torch.equal(view.weight(), W)


def test_bp_rule_gives_plain_qlora_gradients():
    reference = tiny_qlora()
    model = copy.deepcopy(reference)
    ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
    reference(**batch()).loss.backward()
    model(**batch()).loss.backward()
    expected, got = lora_grads(reference), lora_grads(model)
    assert expected.keys() == got.keys() and len(got) == 28
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_the_default_on_qlora_skips_the_bottom_third_and_keeps_the_rest_exact():
    """for_finetuning() on 4-bit bases: of the 2 blocks' 4 branches the bottom one (block 0's
    attention) skips, so its input side gets no gradient and its output projection (the tail) one;
    every other adapter gets QLoRA's exact gradient; it trains."""
    model = tiny_qlora()
    exact = copy.deepcopy(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig.for_finetuning())
    exact(**batch()).loss.backward()
    model(**batch()).loss.backward()
    got, expected = lora_grads(model), lora_grads(exact)
    skipped = [n for n in expected if "layers.0.self_attn." in n]
    rest = [n for n in expected if n not in skipped]
    assert len(rest) > len(skipped) and all(torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-7) for n in rest)
    assert all(n not in got for n in skipped if "q_proj" in n or "v_proj" in n)
    assert any("layers.0.self_attn.o_proj.lora_B" in n for n in got)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        plugin.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_low_rank_feedback_changes_qlora_gradients_and_trains():
    model = tiny_qlora()  # v0.2.0's for_finetuning(): rank-2 sampled feedback below the exact top
    plugin = ldfa_hf.wrap(model, LDFAConfig.for_finetuning(rule="sampled", rank=2, exact_top=0.67, skip_branches=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for step in range(12):
        if step == 1:  # below the exact top layers: rank-2 feedback plus a sampled correction, never exact
            exact = copy.deepcopy(model)  # a copy trains with exact backprop (its hooks are orphans)
            exact(**batch()).loss.backward()
        loss = model(**batch()).loss
        loss.backward()
        if step == 1:
            got, expected = lora_grads(model), lora_grads(exact)
            assert got.keys() == expected.keys()
            lower = [n for n in got if "layers.0." in n]
            assert any(not torch.allclose(got[n], expected[n], atol=1e-6) for n in lower)
            upper = [n for n in got if "layers.1.mlp.down_proj.lora_B" in n]  # the last layer sees the exact error
            assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in upper)
        optimizer.step(); optimizer.zero_grad(); plugin.step()
        losses.append(loss.item())
    assert plugin.stats()["skipped_updates"] == 0
    exact_model = tiny_qlora()  # the same run with exact QLoRA gradients
    ldfa_hf.wrap(exact_model, LDFAConfig(rule="bp"))
    optimizer = torch.optim.AdamW([p for p in exact_model.parameters() if p.requires_grad], lr=5e-2)
    exact_losses = []
    for step in range(12):
        loss = exact_model(**batch()).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        exact_losses.append(loss.item())
    assert losses[0] == pytest.approx(exact_losses[0])
    assert losses[0] - losses[-1] > 0.5 * (exact_losses[0] - exact_losses[-1]) > 0


def test_weight_is_read_right_after_bitsandbytes_repacks_it_for_cpu_inference():
    """On a CPU with AVX512-BF16 an eval forward under no_grad re-packs a Linear4bit weight in place
    for bitsandbytes' inference kernel. The re-pack is plain torch, so it is done here directly (any
    CPU): LDFA must read the W that kernel uses, with the block scales rounded to bfloat16, and leave
    the module packed. Block scales differ by 100x across a row, so a transposed scale table shows."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    for double_quant in (False, True):
        layer = nn.Linear(256, 128, bias=False)
        with torch.no_grad():
            layer.weight.mul_(torch.logspace(-1, 1, 256).repeat_interleave(1)[None, :])
        q = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
        q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
        q = q.to("cpu")
        model = nn.Sequential(q)
        plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
        before = plugin.layers["0"].weight().clone()
        q.weight.data, q.weight.quant_state = bnbf._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
        after = plugin.layers["0"].weight()
        assert after.shape == before.shape == (128, 256)
        # only the block scales' bfloat16 rounding separates the two (2^-8 relative)
        assert torch.allclose(after, before, rtol=2 ** -7, atol=0), double_quant
        assert (after - before).norm() / before.norm() < 2e-3
        assert q.weight.quant_state.packing_format_for_cpu  # the module is left as bitsandbytes made it
        plugin.detach()


def test_forward_with_gradients_never_takes_the_cpu_inference_kernel(monkeypatch):
    """bitsandbytes re-packs a weight for its bf16 CPU kernel when a forward's input needs no gradient
    outside training mode. LDFA's detached input must not send a forward with gradients there: the
    same layers re-pack with and without LDFA, and the forward and LoRA gradients are bit-identical.
    The instruction set is simulated (the flag bitsandbytes reads), so this runs on every CPU."""
    import bitsandbytes.nn.modules as bnb_modules

    repacked: list = []

    def spy(data, state, *args, **kwargs):  # record, leave the weight as it is (no kernel needed)
        repacked.append(next(n for n, m in current.named_modules() if isinstance(m, bnb.nn.Linear4bit)
                             and m.weight.data_ptr() == data.data_ptr()))
        return data, state

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", spy)
    reference = tiny_qlora()
    model = copy.deepcopy(reference)
    ldfa_hf.wrap(model, LDFAConfig(rule="bp"))
    results = {}
    for key, current in (("plain", reference), ("ldfa", model)):
        current.eval()  # from_pretrained's mode, in which the kernel choice depends on requires_grad
        for module in current.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
        repacked.clear()
        out = current(**batch())
        out.loss.backward()
        results[key] = (sorted(repacked), out.logits.detach(), lora_grads(current))
        assert all(m.support_avx512bf16_for_cpu for m in current.modules() if isinstance(m, bnb.nn.Linear4bit))
    (plain_packed, plain_logits, plain_grads), (packed, logits, grads) = results["plain"], results["ldfa"]
    assert packed == plain_packed and len(plain_packed) < 14  # only inputs that need no gradient
    assert torch.equal(logits, plain_logits)
    assert grads.keys() == plain_grads.keys() and len(grads) == 28
    for name in grads:
        assert torch.allclose(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7), name


def test_llm_sft_tiny_qlora_loads_through_bitsandbytes_config(tmp_path):
    from benchmarks import llm_sft

    model, _ = llm_sft.base_model(tiny=True, peft="qlora")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    out = tmp_path / "llm.csv"
    llm_sft.main(["--tiny", "--peft", "qlora", "--methods", "finetune", "--out", str(out)])
    (row,) = csv.DictReader(open(out))
    assert row["peft"] == "qlora" and float(row["eval_loss"]) > 0
