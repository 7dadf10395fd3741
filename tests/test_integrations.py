"""Every integrations/ script runs in its tiny mode (the multi-process and resume paths are
exercised in test_distributed.py and test_trainer.py, the PEFT one in test_peft.py)."""

import os
import sys

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "integrations"))


def test_convnext_pretrain_tiny(tmp_path, capsys):
    import convnext_pretrain

    accuracy = convnext_pretrain.main(["--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0 and "conv layers 2" in out and "ldfa steps 3" in out


def test_hf_trainer_text_tiny(tmp_path, capsys):
    import hf_trainer_text

    trainer, plugin = hf_trainer_text.main(["--tiny", "--max-steps", "3", "--save-steps", "3",
                                            "--output-dir", str(tmp_path)])
    assert plugin.num_steps == 3
    assert os.path.exists(tmp_path / "checkpoint-3" / "ldfa_state.safetensors")
    assert "ldfa/feedback_error" in trainer.state.log_history[0]


def test_accelerate_ddp_single_process_tiny(tmp_path, capsys):
    import accelerate_ddp
    from safetensors.torch import load_file

    accelerate_ddp.main(["--tiny", "--steps", "3", "--save-dir", str(tmp_path)])
    out = capsys.readouterr().out
    state = load_file(tmp_path / "factors_rank0.safetensors")
    assert int(state["__ldfa__.num_steps"]) == 3  # the plugin stepped once per optimizer step
    factors = {k: v for k, v in state.items() if k.endswith((".P", ".Q"))}
    assert factors and all(torch.isfinite(v).all() for v in factors.values())
    assert "step 2 loss" in out and "estimated backward multiply-adds" in out
