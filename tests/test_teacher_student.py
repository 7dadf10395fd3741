"""docs/METHOD.md §4, invariant 5: adaptive feedback at r ≥ d matches backprop, fixed r = d and any r < d do not."""

import os

import pytest

from benchmarks import teacher_student


@pytest.fixture(scope="module")
def losses():
    d = 4
    cells = {"bp": ("bp", d), "svd": ("svd", d), "local": ("local", d), "oja": ("oja", d),
             "fixed": ("fixed", d), "svd_low": ("svd", d // 2), "local_low": ("local", d // 2), "oja_low": ("oja", d // 2)}
    return {key: teacher_student.run(rule, rank, d) for key, (rule, rank) in cells.items()}


def test_adaptive_rules_at_task_rank_match_backprop(losses):
    for rule in ("svd", "local", "oja"):
        assert teacher_student.matches(losses[rule], losses["bp"]), (rule, losses)
    assert not teacher_student.matches(losses["fixed"], losses["bp"]), losses


def test_fixed_feedback_at_task_rank_is_clearly_worse(losses):
    assert losses["fixed"] >= 5 * losses["bp"], losses
    assert losses["fixed"] >= 3 * max(losses["svd"], losses["oja"]), losses


def test_every_rule_below_task_rank_falls_short(losses):
    for rule in ("svd_low", "local_low", "oja_low"):
        assert losses[rule] >= 3 * losses["bp"], (rule, losses)


def test_cli_tiny(capsys, tmp_path):
    out = tmp_path / "ts.csv"
    rows = teacher_student.main(["--tiny", "--out", str(out)])
    assert {(r["method"], r["rank"]) for r in rows} == {
        ("bp", "2"), ("svd", "2"), ("fixed", "2"), ("local", "2"), ("oja", "2"), ("svd", "1"), ("svd", "4"),
        ("fixed", "1"), ("fixed", "4")}
    assert "smallest svd rank" in capsys.readouterr().out and os.path.getsize(str(out)[:-4] + ".png") > 1000
