"""PEFT LoRA: LDFA on the frozen base layers, adapters exact, adapter checkpoints unchanged."""

import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import ldfa_hf  # noqa: E402
from ldfa_hf import LDFAConfig  # noqa: E402

# these tests exercise the mechanics with the default rule on a LoRA model, which warns (tested below)
pytestmark = pytest.mark.filterwarnings("ignore:LDFA rule='svd' on a model whose targeted weights:ldfa_hf.LDFAWarning")

from conftest import batch_for, tiny_bert  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_bert():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        task_type="SEQ_CLS", lora_dropout=0.0)
    model = get_peft_model(tiny_bert(), config)
    for name, param in model.named_parameters():  # make B non-zero so every path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def test_targets_are_base_layers_never_adapters():
    model = lora_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    names = list(plugin.targets)
    assert not any("lora_" in n for n in names)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer" in names
    assert "base_model.model.bert.encoder.layer.0.attention.self.key" in names  # frozen, no adapter
    frozen = dict(model.named_modules())["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer"]
    assert not frozen.weight.requires_grad


def test_adapter_gradients_are_exact_given_the_error_at_their_layer():
    model = lora_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    lora_layer = dict(model.named_modules())["base_model.model.bert.encoder.layer.1.attention.self.value"]
    seen = {}

    def record(module, args, output):
        seen["x"] = args[0]
        output.register_hook(lambda g: seen.__setitem__("delta", g))

    handle = lora_layer.register_forward_hook(record)
    model(**batch_for("bert")).loss.backward()
    handle.remove()
    A, B = lora_layer.lora_A["default"], lora_layer.lora_B["default"]
    with plugin.disabled():
        x = seen["x"].detach()
        out = B(A(x)) * lora_layer.scaling["default"]
        expected = torch.autograd.grad(out, [A.weight, B.weight], seen["delta"])
    assert torch.allclose(A.weight.grad, expected[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(B.weight.grad, expected[1], rtol=1e-5, atol=1e-7)
    # and the frozen path below really is low-rank: its input gradient differs from backprop's
    assert plugin.stats(batch_for("bert"))["mean_angle"] > 1.0


def test_adapter_save_and_load_unaffected(tmp_path):
    model = lora_bert()
    plain = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {k for k in plain}
    plugin.detach()
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    for key, value in peft.get_peft_model_state_dict(reloaded).items():
        assert torch.equal(value, plain[key]), key


def test_peft_lora_script_tiny(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "integrations", "peft_lora.py"), "--tiny",
                             "--max-steps", "3", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ldfa steps 3" in result.stdout
    assert os.path.exists(tmp_path / "adapter_model.safetensors")


def test_ldfa_step_on_frozen_layers_allocates_no_more_than_backprop():
    from torch import nn

    from benchmarks.speed import TensorMemory

    peaks = {}
    for method in ("bp", "ldfa"):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], lora_dropout=0.0))
        if method == "ldfa":
            ldfa_hf.wrap(model, LDFAConfig(rank=4))
        x, target = torch.randn(512, 128), torch.randn(512, 128)
        torch.nn.functional.mse_loss(model(x), target).backward()  # gradients exist, as in training
        with TensorMemory() as tracker:
            loss = torch.nn.functional.mse_loss(model(x), target)
            model.zero_grad(set_to_none=True)
            loss.backward()
        peaks[method] = tracker.peak
    assert peaks["ldfa"] <= peaks["bp"], peaks  # an unneeded output gradient once kept 512×128 floats alive


@pytest.mark.filterwarnings("error::ldfa_hf.LDFAWarning")
def test_default_rule_on_a_frozen_lora_base_warns_and_for_finetuning_does_not():
    with pytest.warns(ldfa_hf.LDFAWarning, match=r"mostly frozen \(\d+ of \d+.*LDFAConfig.for_finetuning\(\)"):
        ldfa_hf.wrap(lora_bert(), LDFAConfig(rank=2))
    ldfa_hf.wrap(lora_bert(), LDFAConfig.for_finetuning(rank=2))  # no warning: the error filter would raise
    ldfa_hf.wrap(tiny_bert(), LDFAConfig(rank=2))  # training from scratch: svd is the right rule, no warning


def test_a_peft_classifier_head_is_targeted_once_the_copy_that_runs():
    """PEFT keeps the head twice for modules_to_save; only the adapter's copy runs in forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=1, pad_token_id=0))
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule="bp"))
    heads = [n for n in plugin.targets if ".score." in n]
    assert heads == ["base_model.model.score.modules_to_save.default"]
    text = plugin.summary(print_fn=None)
    assert "classification head: base_model.model.score.modules_to_save.default (1 x 32), LDFA feedback" in text
    assert "original_module" not in text


def test_a_sequence_classifier_whose_head_cannot_be_found_is_refused_unchanged():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=3, pad_token_id=0))
    model.verdict = model.score  # a head under a name no family uses
    del model.score
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot find the head of LlamaForSequenceClassification.*'score'.*"
                                         r"children are \['model', 'verdict'\]"):
        ldfa_hf.wrap(model, ldfa_hf.LDFAConfig.for_finetuning())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.score = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(32, 3))  # a head with a linear layer inside
    text = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule="bp")).summary(print_fn=None)
    assert "classification head: score.1 (3 x 32), LDFA feedback" in text
