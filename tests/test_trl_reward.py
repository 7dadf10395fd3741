"""TRL's RewardTrainer + PEFT LoRA (SEQ_CLS, built by TRL) + LDFA: trains through the trainer's own
choices (gradient checkpointing, chosen-then-rejected batches, the score head in modules_to_save),
logs its metrics, resumes bit-identically; bad input is refused before anything changes."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")

import ldfa_hf  # noqa: E402
from integrations import trl_reward  # noqa: E402


def run(folder, out, *extra):
    return trl_reward.main(["--model", folder, "--output-dir", str(out), "--steps", "4", "--save-steps", "2",
                            "--batch-size", "2", "--grad-accum", "2", "--examples", "32", *extra])


def test_reward_trainer_trains_with_ldfa_logs_its_metrics_and_resumes_bit_identically(tiny_chat_llama_folder, tmp_path):
    trainer = run(tiny_chat_llama_folder, tmp_path / "a")
    assert trainer.args.gradient_checkpointing  # RewardTrainer's default: LDFA gathers in backward, once
    plugin = next(cb.plugin for cb in trainer.callback_handler.callbacks if hasattr(cb, "plugin"))
    assert plugin.num_steps == 4
    assert [n for n in plugin.targets if "score" in n] in ([], ["base_model.model.score.modules_to_save.default"])
    assert not any("original_module" in n for n in plugin.targets)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and {"accuracy", "margin"} <= set(logged[-1]) and all(torch.isfinite(torch.tensor(h["loss"]))
                                                                      for h in logged)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    run(tiny_chat_llama_folder, tmp_path / "b", "--resume")
    for name in ("adapter_model.safetensors", "ldfa_state.safetensors"):
        a, b = (load_file(tmp_path / run_dir / "checkpoint-4" / name) for run_dir in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_reward_model_needs_one_label_and_a_pad_token(tiny_chat_llama_folder):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    two = AutoModelForSequenceClassification.from_pretrained(tiny_chat_llama_folder, num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        RewardTrainer(model=two, args=RewardConfig(output_dir="unused", use_cpu=True, bf16=False),
                      train_dataset=trl_reward.sum_preferences(4))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_chat_llama_folder, num_labels=1)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        ldfa_hf.wrap(model, ldfa_hf.LDFAConfig.for_finetuning())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # nothing attached
    model.config.pad_token_id = 0
    ldfa_hf.wrap(model, ldfa_hf.LDFAConfig.for_finetuning()).detach()
