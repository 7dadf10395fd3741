"""LDFAConfig: validation on construction and the JSON round trip."""

import json

import pytest

from ldfa_hf import LDFAConfig


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(rank=0), "rank must be a positive int; got 0"),
        (dict(rank=-3), "got -3"),
        (dict(rank=2.5), "got 2.5"),
        (dict(rank=True), "got True"),
        (dict(rule="backprop"), "rule must be one of svd, local, oja, calibrated, streaming, sampled, fixed, fa, dfa, bp"),
        (dict(calibrate_every=0), "calibrate_every must be an int >= 1 (steps between exact calibration steps); got 0"),
        (dict(calibrate_every=2.0), "calibrate_every must be an int >= 1"),
        (dict(calibrate_every="8"), "got '8'"),
        (dict(calibrate_every=True), "got True"),
        (dict(refresh_every=0), "refresh_every must be a positive int, 'auto' or None; got 0"),
        (dict(refresh_every=-5), "got -5"),
        (dict(refresh_every="half-epoch"), "got 'half-epoch'"),
        (dict(feedback_lr=-0.1), "feedback_lr must be a finite number >= 0"),
        (dict(feedback_lr=float("nan")), "feedback_lr"),
        (dict(feedback_weight_decay=-1), "feedback_weight_decay"),
        (dict(target_modules="q_proj(("), "target_modules='q_proj((' is not a valid regular expression"),
        (dict(exclude_modules="[bad"), "exclude_modules='[bad' is not a valid regular expression"),
        (dict(target_modules=[]), "target_modules must be"),
        (dict(target_modules=3), "got 3"),
        (dict(rank_pattern={"qkv(": 3}), "rank_pattern key 'qkv(' is not a valid regular expression"),
        (dict(rank_pattern={"qkv": 0}), "rank_pattern['qkv'] must be a positive int; got 0"),
        (dict(rank_pattern=[("qkv", 3)]), "rank_pattern must be a dict"),
        (dict(include_conv="yes"), "include_conv must be a bool"),
        (dict(error_clip=-1.0), "error_clip must be a positive number"),
        (dict(seed="0"), "seed must be an int"),
    ],
)
def test_invalid_values_raise_with_what_was_found(kwargs, words):
    with pytest.raises(ValueError) as info:
        LDFAConfig(**kwargs)
    assert words in str(info.value)


def test_json_round_trip(tmp_path):
    config = LDFAConfig(rank=7, rank_pattern={"qkv": 21}, rule="local", target_modules=["q_proj", "v_proj"],
                        exclude_modules="lm_head", include_conv=False, refresh_every=None, feedback_lr=1e-3,
                        feedback_weight_decay=0.0, error_clip=None, seed=3)
    assert LDFAConfig.from_dict(json.loads(config.to_json_string())) == config
    path = config.save_pretrained(tmp_path)
    assert path.endswith("ldfa_config.json")
    assert LDFAConfig.from_pretrained(tmp_path) == config


def test_tuples_become_lists_so_json_round_trips():
    config = LDFAConfig(target_modules=("q", "v"))
    assert LDFAConfig.from_dict(json.loads(config.to_json_string())) == config


def test_unknown_keys_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="unknown keys"):
        config = LDFAConfig.from_dict({"rank": 4, "from_the_future": 1})
    assert config.rank == 4


def test_from_pretrained_names_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ldfa_config.json")):
        LDFAConfig.from_pretrained(tmp_path)
    (tmp_path / "ldfa_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="ldfa_config.json is not valid JSON"):
        LDFAConfig.from_pretrained(tmp_path)
    (tmp_path / "ldfa_config.json").write_text('{"rank": -1}')
    with pytest.raises(ValueError, match="ldfa_config.json is invalid: rank must be a positive int"):
        LDFAConfig.from_pretrained(tmp_path)


def test_rule_names_have_one_home():
    from typing import get_args

    from ldfa_hf.config import RuleName
    from ldfa_hf.rules import BUILTIN, RULES

    assert get_args(RuleName) == BUILTIN
    for name in BUILTIN:
        rule = RULES[name]
        assert rule.name == name and rule.label
        LDFAConfig(rule=name)
