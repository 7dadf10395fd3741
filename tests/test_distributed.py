"""Two real CPU processes (gloo): factors identical on every rank, and equal to one process
running the same global batch. Launched the ways users launch: accelerate and torchrun."""

import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "integrations", "accelerate_ddp.py")
BIN = os.path.dirname(sys.executable)


def launch(launcher, out, rule, steps=24, batch=8):
    port = str(random.randint(20000, 40000))
    args = ["--tiny", "--rule", rule, "--steps", str(steps), "--batch-size", str(batch), "--save-dir", str(out),
            "--calibrate-every", "5"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if launcher == "accelerate":
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", port, SCRIPT, *args]
    elif launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", port, SCRIPT, *args]
    else:
        cmd = [sys.executable, SCRIPT, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Oja's P follows the top-r subspace of each layer's error stream; in this tiny BERT the
# key/query errors are ~1e-8 at init, so that subspace is set by float rounding and the
# one- and two-process runs (different summation order) drift apart by up to ~1.4e-3.
# calibrated re-aims on steps 0, 5, 10, 15, 20 from gradient sketches all-reduced across ranks; a
# rank-8 subspace of a tiny model's nearly flat spectrum turns with the float32 summation order
# (measured: P Q within 0.2% relative after one calibration and after 24 steps), so the one-process
# comparison is relative for it, while the two ranks stay bit-identical.
@pytest.mark.parametrize("rule, launcher, tol", [("local", "accelerate", 1e-5), ("oja", "torchrun", 5e-3),
                                                 ("calibrated", "torchrun", 1e-2)])
def test_two_processes_hold_identical_factors_equal_to_one_process(tmp_path, rule, launcher, tol):
    launch(launcher, tmp_path / "two", rule)
    launch("single", tmp_path / "one", rule, batch=16)  # the same global batch in one process
    rank0 = load_file(tmp_path / "two" / "factors_rank0.safetensors")
    rank1 = load_file(tmp_path / "two" / "factors_rank1.safetensors")
    single = load_file(tmp_path / "one" / "factors_rank0.safetensors")
    assert int(rank0["__ldfa__.num_steps"]) == 24
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # identical on every rank
    moved = 0
    for key in rank0:
        if rule == "calibrated" and key.endswith(".P"):
            # compare the feedback P Q the backward uses: a calibrated P is a basis of a subspace, and
            # a different summation order may pick another basis (rotated, or sign-flipped) of it
            two, one = rank0[key] @ rank0[key[:-1] + "Q"], single[key] @ single[key[:-1] + "Q"]
            assert float((two - one).norm() / one.norm()) <= tol, key
            moved += 1
        elif rule != "calibrated" and key.endswith((".P", ".Q")):
            assert torch.allclose(rank0[key], single[key], atol=tol, rtol=0), key
            moved += 1
    assert moved > 0
    w2 = load_file(tmp_path / "two" / "weights_rank0.safetensors")
    w1 = load_file(tmp_path / "one" / "weights_rank0.safetensors")
    weight_tol = 1e-3 if rule == "calibrated" else max(tol, 1e-5)
    assert all(torch.allclose(w2[k], w1[k], atol=weight_tol) for k in w1)


def test_trainer_on_two_processes(tmp_path):
    script = os.path.join(ROOT, "integrations", "hf_trainer_text.py")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(random.randint(20000, 40000)), script, "--tiny", "--rule", "local", "--max-steps", "4",
           "--save-steps", "2", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ldfa steps 4" in result.stdout
    assert os.path.exists(tmp_path / "checkpoint-4" / "ldfa_state.safetensors")
