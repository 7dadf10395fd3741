"""State: safetensors round trip, exact continuation, and errors that name the file."""

import os

import pytest
import torch
from torch import nn

import ldfa_hf
from ldfa_hf import LDFAConfig, LDFAPlugin

from conftest import batch_for, clone, tiny_bert


def train(model, plugin, steps, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        optimizer.zero_grad()
        model(**batch_for("bert", seed=seed + i)).loss.backward()
        optimizer.step()
        plugin.step()


@pytest.mark.parametrize("rule", ["svd", "local", "oja", "calibrated", "fixed", "dfa", "bp"])
def test_save_load_round_trip_continues_exactly(tmp_path, rule):
    torch.manual_seed(0)
    model = tiny_bert()
    config = LDFAConfig(rule=rule, rank=3, refresh_every=3, **({"calibrate_every": 3} if rule == "calibrated" else {}))
    plugin = ldfa_hf.wrap(model, config)
    train(model, plugin, 2)
    plugin.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ldfa_config.json", "ldfa_state.safetensors"]
    other_model = tiny_bert()
    other_model.load_state_dict(model.state_dict())
    restored = LDFAPlugin.from_pretrained(tmp_path, other_model)
    assert restored.num_steps == 2 and restored.config == config
    train(model, plugin, 3, seed=10)
    train(other_model, restored, 3, seed=10)
    expected, got = plugin.state_dict(), restored.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)


def test_state_is_safetensors_not_pickle(tmp_path):
    layer = nn.Linear(4, 3)
    plugin = ldfa_hf.wrap(layer, LDFAConfig(rule="local", rank=2))
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    plugin.step()
    plugin.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ldfa_state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {".P", ".Q", ".P.exp_avg", "__ldfa__.num_steps"} <= keys


def test_missing_state_file_names_itself_and_leaves_model_unwrapped(tmp_path):
    model = tiny_bert()
    LDFAConfig(rank=2).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ldfa_state.safetensors")):
        LDFAPlugin.from_pretrained(tmp_path, model)
    assert all(not m._forward_hooks for m in model.modules())


def test_corrupt_state_file_names_itself(tmp_path):
    model = tiny_bert()
    ldfa_hf.wrap(clone(model), LDFAConfig(rank=2)).save_pretrained(tmp_path)
    path = tmp_path / "ldfa_state.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{path} is corrupt"):
        LDFAPlugin.from_pretrained(tmp_path, model)
    assert all(not m._forward_hooks for m in model.modules())


def test_state_for_another_model_is_refused_and_model_left_unwrapped(tmp_path):
    ldfa_hf.wrap(nn.Sequential(nn.Linear(4, 3)), LDFAConfig(rank=2)).save_pretrained(tmp_path)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="ldfa_state.safetensors: LDFA state does not match this model's targets: missing"):
        LDFAPlugin.from_pretrained(tmp_path, model)
    assert all(not m._forward_hooks for m in model.modules())


def test_state_with_wrong_rank_is_refused(tmp_path):
    ldfa_hf.wrap(nn.Linear(6, 5), LDFAConfig(rank=2)).save_pretrained(tmp_path)
    plugin = ldfa_hf.wrap(nn.Linear(6, 5), LDFAConfig(rank=3))
    before = plugin.state_dict()
    from ldfa_hf.plugin import load_state_file

    with pytest.raises(ValueError, match="has shape \\(5, 2\\), this model needs \\(5, 3\\)"):
        plugin.load_state_dict(load_state_file(tmp_path / "ldfa_state.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), plugin.state_dict().values()))
