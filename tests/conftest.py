"""Tiny models built from configs, and the helpers the tests share."""

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_chat_llama_folder(tmp_path_factory) -> str:
    """A saved 2-block random Llama with its locally built chat tokenizer (``llm_sft.tiny_llama``),
    for code that loads a model by path (TRL, the README's snippets). Read only."""
    from benchmarks.llm_sft import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_chat_llama")
    model, tokenizer = tiny_llama()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=4,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def tiny_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=1, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2,
                         image_size=16, num_labels=4, drop_path_rate=0.0)
    return ConvNextForImageClassification(cfg)


def batch_for(name, size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name in ("gpt2", "llama"):
        ids = torch.randint(0, 64, (size, 8), generator=g)
        return {"input_ids": ids, "labels": ids}
    if name == "bert":
        return {"input_ids": torch.randint(0, 64, (size, 8), generator=g),
                "labels": torch.randint(0, 3, (size,), generator=g)}
    if name == "vit":
        return {"pixel_values": torch.randn(size, 1, 8, 8, generator=g),
                "labels": torch.randint(0, 4, (size,), generator=g)}
    if name == "convnext":
        return {"pixel_values": torch.randn(size, 1, 16, 16, generator=g),
                "labels": torch.randint(0, 4, (size,), generator=g)}
    raise KeyError(name)


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "vit": tiny_vit, "convnext": tiny_convnext}


@pytest.fixture(params=sorted(MODELS))
def hf_model(request):
    """(name, model, batch) for each tiny Hugging Face model, seeded."""
    torch.manual_seed(0)
    model = MODELS[request.param]()
    model.train()
    return request.param, model, batch_for(request.param)


def param_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def layer_input_grads(model, names, batch, plugin=None):
    """Gradient of the loss at each named layer's input (via forward pre-hooks)."""
    modules = dict(model.named_modules())
    captured = {}

    def grab(name):
        def hook(module, args):
            captured[name] = args[0]
        return hook

    handles = [modules[n].register_forward_pre_hook(grab(n), prepend=True) for n in names]
    try:
        loss = model(**batch).loss
        keys = [n for n in names if captured[n].requires_grad]
        grads = torch.autograd.grad(loss, [captured[n] for n in keys])
    finally:
        for h in handles:
            h.remove()
    return dict(zip(keys, grads))


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def clone(model):
    return copy.deepcopy(model)
