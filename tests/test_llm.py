"""LLM fine-tuning pieces: the offline loader's errors, exact_top, summary() at LLM scale, the benchmarks (tiny)."""

import csv

import pytest
import torch

import ldfa_hf
from ldfa_hf import LDFAConfig
from ldfa_hf.pretrained import convert_gguf


def tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_a_missing_or_corrupt_gguf_file_is_named_and_nothing_is_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf is not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x00" * 16)
    with pytest.raises(ValueError, match="truncated.gguf could not be read"):
        convert_gguf(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()


def test_exact_top_leaves_the_layers_nearest_the_output_exact():
    model = tiny_llama()
    names = list(ldfa_hf.wrap(model, LDFAConfig(rank=4, rule="fixed")).targets)
    other = tiny_llama()
    plugin = ldfa_hf.wrap(other, LDFAConfig(rank=4, rule="fixed", exact_top=0.5))
    kept = list(plugin.targets)
    assert kept == names[:len(names) - round(0.5 * len(names))]  # the first half in module order
    assert "lm_head" not in kept and not any(".layers.3." in n for n in kept)  # the top block and head: exact
    with pytest.raises(ValueError, match="exact_top must be a fraction"):
        LDFAConfig(exact_top=1.0)
    with pytest.raises(ValueError, match="exact_top must be a fraction"):
        LDFAConfig(exact_top=-0.1)


def test_summary_groups_same_role_layers_and_says_what_it_assumed():
    model = tiny_llama(layers=6)
    plugin = ldfa_hf.wrap(model, LDFAConfig.for_finetuning(rule="sampled", rank=8, exact_top=0.67, skip_branches=0.0))
    text = plugin.summary(print_fn=None)
    lines = text.splitlines()
    assert len(lines) < 15  # one line per role, not per layer
    assert any(line.split()[:2] == ["2", "model.layers.[0-1].mlp.up_proj"] for line in lines)
    # what runs how, by block: the exact top two thirds and the head, LDFA below them
    assert "LDFA feedback:  blocks 0-1 (" in text and "exact backprop: blocks 2-5, lm_head" in text
    assert "of all 43 linear layers" in text  # the saving is the whole model's, not the LDFA layers' alone
    import re

    assert "assumed" in text and "upper bound" in text and float(re.search(r"(-?[\d.]+)% fewer", text).group(1)) > 0
    given = plugin.summary(print_fn=None, samples=1024)
    assert "1,024 rows (tokens) per layer and step, as given" in given
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    seen = plugin.summary(print_fn=None)
    assert "last training forward" in seen and "assumed" not in seen


def test_summary_of_the_default_says_which_blocks_skip_and_counts_their_saving():
    """for_finetuning(): the bottom third's branches skip on every step (their tails learn), the top
    two thirds are exact, and the estimate counts the skipped branches' linears as running no backward."""
    model = tiny_llama(layers=6)
    plugin = ldfa_hf.wrap(model, LDFAConfig.for_finetuning())
    text = plugin.summary(print_fn=None, samples=512)
    assert "run exact backprop through LDFA's hooks (rule 'bp')" in text and "LDFA hooks:     blocks 0-1" in text
    assert "exact backprop: blocks 2-5, lm_head" in text
    assert "the bottom 4 (blocks 0-1) skip their backward on every step, their output projections still learning" in text
    import re

    saved = float(re.search(r"(-?[\d.]+)% fewer", text).group(1))
    assert 25 < saved < 34  # the bottom 2 of 6 blocks' linears: about a third, less the head's share


def test_summary_of_a_random_cut_gives_its_range_and_the_mean_saving():
    model = tiny_llama(layers=6)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="bp", skip_branches=0.5, branch_allocation="cut", branch_tail=True))
    text = plugin.summary(print_fn=None, samples=512)
    assert plugin.cut_bounds() == (4, 8)
    assert "each step the bottom 4-8 of them (a random depth, uniform; ~50% on average) skip their backward" in text
    import re

    saved = float(re.search(r"(-?[\d.]+)% fewer", text).group(1))
    assert 35 < saved < 50  # on average half the branches, as the fixed cut at the same share


def test_summary_never_prints_a_negative_saving():
    model = tiny_llama(layers=2)
    plugin = ldfa_hf.wrap(model, LDFAConfig(rule="streaming", rank=8))
    text = plugin.summary(print_fn=None, samples=1)  # one row: the re-aim outweighs what the feedback saves
    assert "no saving at this size" in text and "% fewer" not in text


def test_llm_sft_tiny_writes_a_resumable_csv(tmp_path):
    from benchmarks import llm_sft

    out = tmp_path / "llm.csv"
    llm_sft.main(["--tiny", "--methods", "finetune", "calibrated r4 exact0.5", "--out", str(out), "--curve", "2"])
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == ["finetune", "calibrated r4 exact0.5"]
    # one plain LoRA side by side with both methods: the same baseline in both rows
    assert rows[0]["bp_eval_loss"] == rows[1]["bp_eval_loss"] and rows[0]["bp_step_s"] == rows[1]["bp_step_s"]
    assert all(float(r["speedup"]) > 0 and float(r["eval_loss"]) > 0 for r in rows)
    curve = list(csv.DictReader(open(tmp_path / "llm_sft_curve.csv")))
    # steps 1, 2, 4 of each LDFA run, and of backprop once (the same seed's backprop run is not repeated)
    assert sorted({r["method"] for r in curve}) == ["backprop", "calibrated r4 exact0.5", "finetune"]
    assert [int(r["step"]) for r in curve if r["method"] == "backprop"] == [1, 2, 4]
    seconds = [float(r["seconds"]) for r in curve if r["method"] == "finetune"]
    assert seconds == sorted(seconds) and seconds[-1] > 0  # a skipping tiny step can round to 0.00 s
    assert (tmp_path / "llm_sft_curve.png").stat().st_size > 0 and (tmp_path / "llm_sft_curve_train.png").stat().st_size > 0
    llm_sft.main(["--tiny", "--methods", "finetune", "--out", str(out)])  # done cells are not run again
    drawn = llm_sft.drawn_rows(curve, 4, 4, ["finetune"])  # --plot-methods: plain LoRA and the methods named
    assert {r["method"] for r in drawn} == {"backprop", "finetune"} and not llm_sft.drawn_rows(curve, 80, 16)
    alone = [{**r, "peft": "full"} for r in curve if r["method"] == "backprop"]  # a panel with plain LoRA only
    assert llm_sft.drawn_rows(curve + alone, 4, 4, ["finetune"]) == drawn
    assert len(list(csv.DictReader(open(out)))) == 2
    config = llm_sft.config_for("sampled r4 frac0.5 exact0.5", num_layers=2)
    assert (config.rule, config.rank, config.rule_options, config.exact_top) == ("sampled", 4, {"fraction": 0.5}, 0.5)


def test_llm_sft_tiny_full_fine_tuning_trains_every_weight(tmp_path):
    from benchmarks import llm_sft

    model, _ = llm_sft.tiny_llama()
    assert llm_sft.with_lora(model, "full", seed=0) is model
    assert all(p.requires_grad for p in model.parameters())
    out = tmp_path / "llm.csv"
    llm_sft.main(["--tiny", "--peft", "full", "--methods", "finetune", "--out", str(out)])
    (row,) = csv.DictReader(open(out))
    assert row["peft"] == "full" and float(row["eval_loss"]) > 0


def test_llm_sft_cut_baseline_gives_the_blocks_below_no_gradient():
    from benchmarks import llm_sft

    model, tok = llm_sft.tiny_llama()
    model = llm_sft.with_lora(model, "lora", seed=0).train()
    handle = llm_sft.cut_below(model, "floor exact0.5 cut1")
    batch = llm_sft.Encoder(tok).batch(llm_sft.task_examples("arith", 2, 0))
    model(**batch).loss.backward()
    adapters = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}  # A: zero grad while B = 0
    assert all(g is None for n, g in adapters.items() if ".layers.0." in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in adapters.items() if ".layers.1." in n)
    handle.remove()
    assert llm_sft.cut_below(model, "calibrated r32") is None


def test_llm_gradients_tiny_bp_is_exact_and_ldfa_is_not():
    from benchmarks import llm_gradients

    rows = {r["method"]: r for r in llm_gradients.main(["--tiny", "--methods", "bp", "fixed r2"])}
    assert float(rows["bp"]["cos_all"]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows["fixed r2"]["cos_all"]) < 0.99


def test_time_to_quality_counts_steps_to_plain_loras_final_loss_times_the_step_ratio():
    from benchmarks.llm_sft import time_to_quality

    curve = [{"task": "arith", "peft": "lora", "method": m, "seed": 0, "step": step, "eval_loss": loss}
             for m, losses in (("backprop", [1.0, 0.5, 0.3]), ("fast", [0.9, 0.3, 0.2]), ("bad", [1.0, 0.8, 0.6]))
             for step, loss in zip((20, 40, 60), losses)]
    results = [{"task": "arith", "peft": "lora", "method": m, "seed": 0, "speedup": s} for m, s in (("fast", "1.2"),
                                                                                                  ("bad", "1.5"))]
    table = time_to_quality(curve, results).splitlines()
    assert table[2].endswith("| 0.3000 (60; first at 60) | 40 | 1.20× | 1.80× |")  # 60/40 steps × 1.2
    assert "not reached (final 0.6000)" in table[3]
    # plain LoRA's curve dips below its final loss at step 20: an exact copy of it is not "sooner"
    noisy = [{**r, "eval_loss": {20: 0.2, 40: 0.5, 60: 0.3}[r["step"]]} for r in curve if r["method"] == "backprop"]
    twin = [{**r, "method": "twin"} for r in noisy]
    table = time_to_quality(noisy + twin, [{"task": "arith", "peft": "lora", "method": "twin", "seed": 0,
                                            "speedup": "1.0"}]).splitlines()
    assert table[2].endswith("| 0.3000 (60; first at 20) | 20 | 1.00× | 1.00× |")


def test_llm_sft_branch_words_and_the_dropbp_baseline():
    from benchmarks import llm_sft

    cfg = llm_sft.config_for("bp skip0.4 bridge8 tail unbiased depth", 2)
    assert (cfg.skip_branches, cfg.branch_bridge, cfg.branch_tail, cfg.branch_unbiased, cfg.branch_allocation) == \
        (0.4, 8, True, True, "depth")
    model, tok = llm_sft.base_model(tiny=True)
    model = llm_sft.with_lora(model, "lora", seed=0)
    model.train()
    plugin = ldfa_hf.wrap(model, llm_sft.config_for("bp skip0.5 dropbp", 2))
    batch = llm_sft.Encoder(tok).batch(llm_sft.task_examples("arith", 4, seed=0))
    rates = llm_sft.dropbp_rates(model, plugin, batch, 0.5)
    assert rates.shape == (4,) and abs(float(rates.mean()) - 0.5) < 1e-6
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradient behind
    plugin.detach()
    plugin = ldfa_hf.wrap(model, llm_sft.config_for("bp skip0.5 mlp tail", 2))
    llm_sft.pin_branches(plugin, "bp skip0.5 mlp tail")  # the bottom one of the two MLPs, on every step
    cut = ldfa_hf.wrap(llm_sft.with_lora(llm_sft.base_model(tiny=True)[0], "lora", seed=0),
                       llm_sft.config_for("bp skip0.5 cut width1 tail", 2))
    assert cut.cut_bounds() == (2, 2)  # the library's range: the middle half of the widest
    llm_sft.pin_branches(cut, "bp skip0.5 cut width1 tail")
    assert cut.cut_bounds() == (1, 3)  # width1: the widest range of 4 branches, never all 4
    for _ in range(3):
        assert [(b.role, b.depth, b.mode) for b in plugin.branches.values()] == \
            [("attention", 0, "exact"), ("mlp", 0, "skip"), ("attention", 1, "exact"), ("mlp", 1, "exact")]
        plugin.step()
    plugin.detach()
    plugin = ldfa_hf.wrap(model, llm_sft.config_for("bp skip0.5 bottom tail exactevery3", 2))
    llm_sft.pin_branches(plugin, "bp skip0.5 bottom tail exactevery3")
    modes = []
    for _ in range(6):
        modes.append(tuple(b.mode for b in plugin.branches.values()))
        plugin.step()
    bottom, exact = ("skip", "skip", "exact", "exact"), ("exact",) * 4
    assert modes == [exact, bottom, bottom, exact, bottom, bottom]  # steps 0 and 3 run every branch exact
    assert llm_sft.config_for("finetune exactevery3", 2) == ldfa_hf.LDFAConfig.for_finetuning()  # the default + words


def test_docs_task_is_real_instruction_data_whose_held_out_questions_are_never_trained_on(tmp_path):
    from benchmarks import llm_sft
    from benchmarks.data import python_api_docs
    from integrations.trl_sft import chat_dataset

    examples = llm_sft.task_examples("docs", 3000, seed=0)  # more than there are: the training part repeats
    held, train = examples[:llm_sft.DOCS_HELD], examples[llm_sft.DOCS_HELD:]
    assert len(set(held)) == llm_sft.DOCS_HELD and not set(held) & set(train)
    assert len(set(train)) == len(python_api_docs()) - llm_sft.DOCS_HELD
    assert ("In one sentence, what does `heapq.merge` do in Python?",
            "Merge multiple sorted inputs into a single sorted output.") in examples
    row = chat_dataset("docs", 2)[0]
    assert [m["role"] for m in row["prompt"]] == ["user"] and [m["role"] for m in row["completion"]] == ["assistant"]
    llm_sft.main(["--tiny", "--task", "docs", "--methods", "finetune", "--out", str(tmp_path / "docs.csv")])
    with open(tmp_path / "docs.csv") as fh:
        (result,) = list(csv.DictReader(fh))
    assert result["task"] == "docs" and result["exact_match"] == "" and float(result["eval_loss"]) > 0


def test_time_to_quality_interpolates_and_matches_runs_by_steps_and_batch():
    """The crossing is interpolated between curve points, and a method's run is compared with the
    plain LoRA of its own run (same steps and batch size), not with a longer run of the same seed."""
    from benchmarks import llm_sft

    assert llm_sft.reached_at([(1, 1.0), (20, 0.5), (40, 0.2)], 0.3) == pytest.approx(33.33, abs=0.01)
    assert llm_sft.reached_at([(1, 1.0), (20, 0.5)], 0.3) is None
    run = {"task": "arith", "peft": "lora", "seed": "0", "batch_size": "16"}
    curve = [{**run, "method": "backprop", "steps": "120", "step": "120", "eval_loss": "0.05"},  # a longer run
             {**run, "method": "backprop", "steps": "80", "step": "80", "eval_loss": "0.30"},
             {**run, "method": "m", "steps": "80", "step": "40", "eval_loss": "0.40"},
             {**run, "method": "m", "steps": "80", "step": "60", "eval_loss": "0.20"}]
    table = llm_sft.time_to_quality(curve, [{**run, "method": "m", "steps": "80", "speedup": "1.2"}])
    assert "| 0.3000 (80; first at 80) | 50 | 1.20× | 1.92× |" in table


def test_llm_sft_lora_on_the_top_blocks_only_trains_as_the_cut_does(tmp_path):
    import csv

    from benchmarks import llm_sft

    model = llm_sft.with_lora(llm_sft.tiny_llama()[0], "lora", seed=0, top=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)  # PEFT's layers_to_transform: no adapter below
    out = tmp_path / "llm.csv"
    llm_sft.main(["--tiny", "--methods", "bp lora1 head", "bp cut1 head", "--out", str(out)])
    rows = {r["method"]: r for r in csv.DictReader(open(out))}
    assert rows["bp lora1 head"]["eval_loss"] == rows["bp cut1 head"]["eval_loss"]  # the same gradients, two ways
    assert rows["bp lora1 head"]["eval_loss"] != rows["bp lora1 head"]["bp_eval_loss"]
