"""The exact LM head's backward over the non-zero rows of its error (ldfa_hf/zero_rows.py)."""

import copy

import pytest
import torch

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.diagnostics import whole_model_cost
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


def head_rows(model):
    """Records how many rows (tokens) each forward of the model's LM head receives."""
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


def test_an_exact_frozen_head_projects_and_multiplies_only_the_scored_rows_and_stays_exact():
    model = lora_llama()
    twin = copy.deepcopy(model)
    reference = grads(twin, sft_batch())
    with torch.no_grad():
        full = twin(**sft_batch()).logits
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    head = plugin._head
    assert head is not None and head.name.endswith("lm_head") and head.lm is model.base_model.model
    rows = head_rows(model)
    model.zero_grad(set_to_none=True)
    out = model(**sft_batch())
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == reference.keys()
    for name in got:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert rows == [9]  # 3 scored tokens of 12 in each of 3 rows (the last one predicts nothing)
    assert (head.rows_seen, head.rows_kept, head.forward_skips) == (36, 9, True)
    scored = torch.zeros(3, 12, dtype=torch.bool)
    scored[:, 8:11] = True
    torch.testing.assert_close(out.logits[scored], full[scored], rtol=1e-5, atol=1e-6)
    assert not out.logits[~scored].any()  # the rows the loss never reads are zeros
    text = plugin.summary(print_fn=None)
    assert "computes only the rows the loss scores" in text and "9 of 36 rows, forward and backward" in text
    whole = whole_model_cost(plugin)
    assert whole["forward"] - whole["forward_ldfa"] == 27 * 96 * 32  # the head's 27 unscored rows, 96 x 32 each
    assert "the head's unscored forward rows included" in text


def test_without_labels_in_eval_or_without_grad_the_head_computes_every_row():
    model = lora_llama()
    twin = copy.deepcopy(model)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    rows = head_rows(model)
    batch = sft_batch()
    outputs = [model(input_ids=batch["input_ids"])]  # the caller computes its own loss from the logits
    with torch.no_grad():
        outputs.append(model(**batch))
    model.eval()
    outputs.append(model(**batch))  # Trainer's evaluation: metrics may read every logit
    assert rows == [36, 36, 36]
    twin.eval()
    with torch.no_grad():
        full = twin(**batch).logits
    for out in outputs:
        torch.testing.assert_close(out.logits.detach(), full, rtol=1e-5, atol=1e-6)
    model.train()
    model.base_model.model.loss_function = lambda logits, labels, **kwargs: logits.mean()  # a loss of the user's
    model(**batch)
    assert rows[-1] == 36
    plugin.detach()


def make_lm(family: str):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=32,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    for name, param in model.named_parameters():  # the biases train: the head's input needs its gradient
        param.requires_grad_(name.endswith("bias"))
    return model.train()


@pytest.mark.parametrize("family, scored", [("gpt2", [1, 4, 10]), ("bert", [2, 5, 11])])
def test_causal_and_masked_lms_read_their_labels_shifted_or_not(family, scored):
    model = make_lm(family)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5, 11]] = ids[:, [2, 5, 11]]
    batch = {"input_ids": ids, "labels": labels}
    reference = grads(copy.deepcopy(model), batch)
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=[name]))
    assert plugin._head is not None and plugin._head.lm is model
    rows = head_rows(model)
    got = grads(model, batch)
    assert rows == [6] and plugin._head.forward_skips
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    logits = model(**batch).logits
    assert logits[:, scored].any(-1).all() and not logits[:, [0, 3, 6]].any()  # a causal LM's row t predicts t + 1


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
    head.weight.requires_grad_(True)  # full fine-tuning: autograd does the head's backward, over the scored rows
    reference = grads(copy.deepcopy(model), sft_batch())
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    rows = head_rows(model)
    got = grads(model, sft_batch())
    assert rows == [9] and not plugin._head.applies()
    torch.testing.assert_close(got["base_model.model.lm_head.weight"], reference["base_model.model.lm_head.weight"])


def test_detach_removes_the_head_hook_and_copies_train_exactly():
    model = lora_llama()
    head = model.get_output_embeddings()
    lm = model.base_model.model
    before = (dict(head._forward_pre_hooks), dict(head._forward_hooks), dict(lm._forward_pre_hooks))
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", exclude_modules=["lm_head"]))
    assert len(head._forward_hooks) == len(before[1]) + 1 and len(lm._forward_pre_hooks) == len(before[2]) + 1
    twin = copy.deepcopy(model)  # the copy's head hooks are orphans: plain autograd there
    assert twin(**sft_batch()).logits.all()
    assert not twin.get_output_embeddings()._forward_hooks and not twin.base_model.model._forward_pre_hooks
    plugin.detach()
    assert (dict(head._forward_pre_hooks), dict(head._forward_hooks), dict(lm._forward_pre_hooks)) == before


def test_skip_zero_rows_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_zero_rows must be a bool"):
        LDFAConfig(skip_zero_rows="yes")
    config = LDFAConfig(skip_zero_rows=False)
    assert LDFAConfig.from_dict(config.to_dict()) == config
