"""The exact LM head's backward over the non-zero rows of its error (ldfa_hf/zero_rows.py)."""

import copy

import pytest
import torch

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.zero_rows import nonzero_rows_times


def test_the_product_over_nonzero_rows_equals_the_dense_one():
    torch.manual_seed(0)
    W = torch.randn(40, 12)
    g = torch.randn(3, 7, 40)
    g[0, :5] = 0
    g[2, 3] = 0
    g[1, 2, 0] = 0.0  # a non-zero row whose first entry is zero must still be multiplied
    out, kept = nonzero_rows_times(g, W)
    assert kept == 21 - 6
    torch.testing.assert_close(out, g @ W)
    dense, kept = nonzero_rows_times(torch.randn(4, 40), W)
    assert kept == 4
    none, kept = nonzero_rows_times(torch.zeros(2, 5, 40), W)
    assert kept == 0 and none.shape == (2, 5, 12) and not none.any()


def lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


def sft_batch():
    """Loss on the last 3 tokens of each sequence only, as with completion-only SFT."""
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :9] = -100
    return {"input_ids": ids, "labels": labels}


def grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_an_exact_frozen_head_skips_the_zero_rows_and_the_gradients_stay_exact():
    model = lora_llama()
    reference = grads(copy.deepcopy(model), sft_batch())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    head = plugin._head
    assert head is not None and head.name.endswith("lm_head")
    got = grads(model, sft_batch())
    assert got.keys() == reference.keys()
    for name in got:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (head.rows_seen, head.rows_kept) == (36, 9)  # 3 scored tokens of 12 (the last one predicts nothing)
    assert "multiplies only the non-zero rows of its error" in plugin.summary(print_fn=None)


def test_for_finetuning_keeps_the_head_exact_and_skipping_rows():
    model = lora_llama()
    plugin = ldfa_hf.wrap(model, LDFAConfig.for_finetuning(exact_top=0.5))
    assert plugin._head is not None and not any(n.endswith("lm_head") for n in plugin.targets)
    plugin.detach()
    assert ldfa_hf.wrap(model, LDFAConfig.for_finetuning(skip_zero_rows=False))._head is None


def test_a_head_under_ldfa_or_a_trainable_head_is_left_alone():
    model = lora_llama()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="fixed", rank=4))  # the head is targeted: LDFA, not this
    assert plugin._head is None
    plugin.detach()

    model = lora_llama()
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)  # full fine-tuning: autograd does the head's backward itself
    reference = grads(copy.deepcopy(model), sft_batch())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    got = grads(model, sft_batch())
    assert plugin._head.rows_seen == 0
    torch.testing.assert_close(got["base_model.model.lm_head.weight"], reference["base_model.model.lm_head.weight"])


def test_detach_removes_the_head_hook_and_copies_train_exactly():
    model = lora_llama()
    head = model.get_output_embeddings()
    before = (dict(head._forward_pre_hooks), dict(head._forward_hooks))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    assert len(head._forward_hooks) == len(before[1]) + 1
    twin = copy.deepcopy(model)  # the copy's head hook is an orphan: plain autograd there
    twin(**sft_batch()).loss.backward()
    assert not twin.get_output_embeddings()._forward_hooks
    plugin.detach()
    assert (dict(head._forward_pre_hooks), dict(head._forward_hooks)) == before


def test_skip_zero_rows_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_zero_rows must be a bool"):
        LDFAConfig(skip_zero_rows="yes")
    config = LDFAConfig(skip_zero_rows=False)
    assert LDFAConfig.from_dict(config.to_dict()) == config
