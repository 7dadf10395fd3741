"""TRL's SFTTrainer + PEFT LoRA (built by TRL from peft_config=) + LDFA: trains, accumulates, resumes bit-identically."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")

from integrations import trl_sft  # noqa: E402


def run(folder, out, *extra):
    return trl_sft.main(["--model", folder, "--output-dir", str(out), "--steps", "4", "--save-steps", "2",
                         "--batch-size", "2", "--grad-accum", "2", "--examples", "32",
                         "--exact-top", "0",  # 2 blocks: the default leaves LDFA only where no gradient goes down
                         *extra])


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_sft_trainer_with_peft_config_trains_with_ldfa_and_resumes_bit_identically(tiny_chat_llama_folder, tmp_path):
    trainer = run(tiny_chat_llama_folder, tmp_path / "a")
    plugin = next(cb.plugin for cb in trainer.callback_handler.callbacks if hasattr(cb, "plugin"))
    assert plugin.num_steps == 4 and plugin.rule.name == "bp" and plugin.config.branch_allocation == "bottom"
    modes = [b.mode for b in plugin.branches.values()]  # for_finetuning(): the bottom third skips, every step
    skipped = round(len(modes) / 3)
    assert skipped and modes == ["skip"] * skipped + ["exact"] * (len(modes) - skipped)
    assert all(".base_layer" in name or name.endswith("lm_head") for name in plugin.targets)  # never an adapter
    assert sorted(os.listdir(tmp_path / "a" / "checkpoint-2")).count("ldfa_state.safetensors") == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    run(tiny_chat_llama_folder, tmp_path / "b", "--resume")
    for name in ("checkpoint-4",):
        a, b = adapter(tmp_path / "a" / name), adapter(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        sa = load_file(tmp_path / "a" / name / "ldfa_state.safetensors")
        sb = load_file(tmp_path / "b" / name / "ldfa_state.safetensors")
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    run(tiny_chat_llama_folder, tmp_path / "c", "--no-ldfa")  # plain LoRA takes other steps: LDFA changed the gradients
    a, c = adapter(tmp_path / "a" / "checkpoint-4"), adapter(tmp_path / "c" / "checkpoint-4")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sft_trainer_benchmark_alternates_the_methods_and_resumes(tiny_chat_llama_folder, tmp_path, capsys):
    import csv

    from benchmarks import sft_trainer

    out = tmp_path / "sft.csv"
    sft_trainer.main(["--tiny", "--model", tiny_chat_llama_folder, "--task", "arith", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    # round 0 runs plain LoRA first, round 1 LDFA first: a drift in speed falls on both
    assert [(r["round"], r["method"]) for r in rows] == [("0", "lora"), ("0", "finetune"), ("1", "finetune"),
                                                         ("1", "lora")]
    assert all(float(r["step_s"]) > 0 and int(r["tokens_per_step"]) > 0 for r in rows)
    loss = {(r["method"], r["round"]): r["eval_loss"] for r in rows}
    assert loss["lora", "0"] == loss["lora", "1"] and loss["finetune", "0"] == loss["finetune", "1"]  # same steps
    assert loss["lora", "0"] != loss["finetune", "0"]  # LDFA changed the gradients
    assert "| arith | 4 × 2 |" in capsys.readouterr().out
    sft_trainer.main(["--tiny", "--model", tiny_chat_llama_folder, "--task", "arith", "--out", str(out)])
    assert len(list(csv.DictReader(open(out)))) == 4  # finished runs are not repeated
