"""LDFACallback with the Hugging Face Trainer: stepping, logging, checkpoints and resume."""

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import ldfa_hf
from ldfa_hf import LDFACallback, LDFAConfig

from conftest import tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "integrations", "hf_trainer_text.py")


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, seq), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def make_trainer(tmp_path, plugin, model, **kwargs):
    recorder = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no", disable_tqdm=True, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=ToyData(), callbacks=[recorder])
    LDFACallback(plugin).install(trainer)
    return trainer, recorder


def test_factors_updated_once_per_optimizer_step_under_accumulation(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="local", rank=2))
    samples = []
    original = plugin.step

    def spy():
        samples.append(plugin.layers["bert.encoder.layer.0.attention.self.query"].pending_samples)
        original()

    plugin.step = spy
    trainer, _ = make_trainer(tmp_path, plugin, model, gradient_accumulation_steps=3, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and plugin.num_steps == 2
    assert samples == [3 * 4 * 8, 3 * 4 * 8]  # three micro-batches of 4 sequences × 8 tokens, per step


def test_skipped_optimizer_step_does_not_update_factors():
    layer = torch.nn.Linear(4, 3)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="local", rank=2))
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    before = plugin.layers[""].P.clone()
    callback = LDFACallback(plugin)
    callback.on_optimizer_step(None, None, None, optimizer=SimpleNamespace(step_was_skipped=True))
    assert plugin.num_steps == 0 and torch.equal(before, plugin.layers[""].P)
    assert plugin.layers[""].pending_samples == 0  # the overflowed statistics are dropped
    callback.on_optimizer_step(None, None, None, optimizer=SimpleNamespace(step_was_skipped=False))
    assert plugin.num_steps == 1


def test_ldfa_scalars_reach_callbacks_that_come_first(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    trainer, recorder = make_trainer(tmp_path, plugin, model, max_steps=2)
    trainer.train()
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert train_logs and all("ldfa/feedback_error" in log and "ldfa/skipped_updates" in log for log in train_logs)
    assert "ldfa/feedback_error" in trainer.state.log_history[0]


def test_install_puts_the_callback_ahead_of_reporters_and_is_idempotent(tmp_path):
    from transformers.trainer_callback import DefaultFlowCallback

    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    recorder = Recorder()
    callback = LDFACallback(plugin)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyData(), callbacks=[recorder, callback])
    callbacks = trainer.callback_handler.callbacks
    assert callbacks.index(recorder) < callbacks.index(callback)
    callback.install(trainer)
    callback.install(trainer)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback) and callbacks[1] is callback
    assert callbacks.count(callback) == 1 and recorder in callbacks


def _tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(folder):
        if any(f.startswith("events.out") for f in files):
            accumulator = EventAccumulator(root)
            accumulator.Reload()
            tags |= set(accumulator.Tags().get("scalars", []))
    return tags


def test_installed_callback_scalars_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard"], use_cpu=True, max_steps=2,
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyData())
    LDFACallback(plugin).install(trainer)
    trainer.train()
    tags = _tensorboard_tags(tmp_path)
    assert "train/loss" in tags
    assert {"train/ldfa/feedback_error", "train/ldfa/skipped_updates"} <= tags, tags


def test_passing_the_callback_with_reporters_warns_how_to_reach_them(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard"], use_cpu=True, max_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyData(), callbacks=[LDFACallback(plugin)])
    with pytest.warns(ldfa_hf.LDFAWarning, match="install"):
        trainer.train()


def test_probe_batch_adds_the_angle(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    data = ToyData()
    probe = {"input_ids": data.ids[:4], "labels": data.labels[:4]}
    recorder = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no", max_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    LDFACallback(plugin, probe_batch=probe).install(trainer)
    trainer.train()
    angles = [log["ldfa/angle"] for log in recorder.logs if "ldfa/angle" in log]
    assert angles and 0 < angles[0] < 90


def run_script(out, *extra, pause=0.0, rule="oja"):
    # calibrated: calibrations on steps 0, 3, 6, so the resumed half (from checkpoint 4) has one of its own
    cmd = [sys.executable, SCRIPT, "--tiny", "--rule", rule, "--calibrate-every", "3", "--max-steps", "8",
           "--save-steps", "2", "--output-dir", str(out), *extra]
    if pause:
        cmd += ["--pause-after-save", str(pause)]
    return cmd


def final_state(out):
    return load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(out, "ldfa_state.safetensors"))


@pytest.fixture(scope="module", params=["oja", "calibrated"])
def uninterrupted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(run_script(out, rule=request.param), check=True, cwd=ROOT, capture_output=True)
    return request.param, final_state(out)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    rule, (ref_weights, ref_factors) = uninterrupted
    proc = subprocess.Popen(run_script(tmp_path, pause=30, rule=rule), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("saved checkpoint-4"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.exists(tmp_path / "checkpoint-4" / "ldfa_state.safetensors")
    assert not os.path.exists(tmp_path / "checkpoint-6")
    subprocess.run(run_script(tmp_path, "--resume", rule=rule), check=True, cwd=ROOT, capture_output=True)
    weights, factors = final_state(tmp_path)
    assert weights.keys() == ref_weights.keys() and factors.keys() == ref_factors.keys()
    for key in ref_weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    for key in ref_factors:
        assert torch.equal(factors[key], ref_factors[key]), key


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_with_damaged_ldfa_state_fails_naming_the_file(tmp_path, damage):
    subprocess.run(run_script(tmp_path, "--max-steps", "2"), check=True, cwd=ROOT, capture_output=True)
    path = tmp_path / "checkpoint-2" / "ldfa_state.safetensors"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x00garbage")
    result = subprocess.run(run_script(tmp_path, "--resume", "--max-steps", "4"), cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert ("does not exist" in result.stderr) if damage == "missing" else ("is corrupt" in result.stderr)


def test_trainer_gives_the_plugin_its_epoch_length_for_auto_refresh(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    plugin = ldfa_hf.wrap(model, LDFAConfig(rank=2))
    assert plugin.config.refresh_every == "auto" and plugin.refresh_interval == 500  # epoch length unknown
    trainer, _ = make_trainer(tmp_path, plugin, model, gradient_accumulation_steps=2, max_steps=2)
    trainer.train()
    # 24 examples / batch 4 = 6 batches, 2 per optimizer step: 3 steps an epoch, refresh every 1
    assert plugin.steps_per_epoch == 3 and plugin.refresh_interval == 1
    assert ldfa_hf.wrap(tiny_bert(), LDFAConfig(rank=2, refresh_every=7)).refresh_interval == 7


def test_callback_warns_when_skipped_branches_meet_ddp_without_unused_parameters():
    from test_branches import tiny_llama

    plugin = ldfa_hf.wrap(tiny_llama(2), LDFAConfig(rule="bp", skip_branches=0.5))
    callback = LDFACallback(plugin)
    callback._installed = True
    args = SimpleNamespace(report_to="none", world_size=2, fsdp="", deepspeed=None, gradient_accumulation_steps=1,
                           ddp_find_unused_parameters=None)
    state = SimpleNamespace(global_step=0)
    with pytest.warns(ldfa_hf.LDFAWarning, match="ddp_find_unused_parameters=True"):
        callback.on_train_begin(args, state, None)
    args.ddp_find_unused_parameters = True
    callback.on_train_begin(args, state, None)  # no warning: the package's warnings fail a test
