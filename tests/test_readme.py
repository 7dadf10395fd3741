"""Every Python snippet of the README runs as written, at tiny size and without downloads.

Each snippet is marked ``<!-- readme-test: NAME -->``; the names it uses but does not define
(``model``, ``loader``, ``args``, ...) are the ones the README's text says it expects, made here
tiny. The TRL snippet runs whole, with ``ldfa_hf.pretrained.smollm2_path`` pointing at a tiny
local Llama and its locally built tokenizer.
"""

import os
import re

import pytest
import torch

import ldfa_hf

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def snippets() -> dict:
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"(<!-- readme-test: (\w+) -->\n)?```python\n(.*?)```", text, flags=re.S)
    unmarked = [code.splitlines()[0] for marker, _, code in blocks if not marker]
    assert not unmarked, f"README Python snippets without a readme-test marker (so untested): {unmarked}"
    return {name: code for _, name, code in blocks}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def batches(n, size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (size, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_every_snippet_is_marked_and_known():
    assert set(snippets()) == {"loop", "trainer", "trl", "reward", "rule"}


def test_wrap_loop_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    scope = {"model": model, "loader": batches(3), "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)}
    exec(snippets()["loop"], scope)
    assert (tmp_path / "out" / "ldfa_state.safetensors").exists() and (tmp_path / "out" / "config.json").exists()
    assert ldfa_hf.LDFAConfig.from_pretrained(tmp_path / "out").rank == 16


def test_trainer_snippet(tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import TrainingArguments

    monkeypatch.chdir(tmp_path)
    rows = [{"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()} for b in batches(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                             use_cpu=True, report_to="none", save_strategy="no")
    scope = {"model": tiny_llama(), "args": args, "ds": Dataset.from_list(rows)}
    exec(snippets()["trainer"], scope)
    assert scope["trainer"].state.global_step == 2 and scope["plugin"].num_steps == 2


def test_trl_snippet_runs_as_written_on_a_tiny_local_llama(tmp_path, monkeypatch, tiny_chat_llama_folder):
    pytest.importorskip("trl")
    folder = tiny_chat_llama_folder
    monkeypatch.setattr(ldfa_hf.pretrained, "smollm2_path", lambda *a, **k: folder)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippets()["trl"], scope)
    assert scope["trainer"].state.global_step == 10 and scope["plugin"].num_steps == 10
    assert scope["plugin"].config == ldfa_hf.LDFAConfig.for_finetuning()


def test_rule_snippet(tmp_path, monkeypatch):
    from ldfa_hf.rules import BUILTIN, RULES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ldfa_hf.rules.RULES", dict(RULES))  # the snippet's rule stays in this test
    scope = {"model": tiny_llama()}
    exec(snippets()["rule"], scope)
    assert ldfa_hf.LDFAConfig.from_pretrained(tmp_path / "out").rule == "damped_svd"
    assert "damped_svd" not in BUILTIN


def test_reward_snippet_runs_as_written_on_a_tiny_local_llama(tmp_path, monkeypatch, tiny_chat_llama_folder):
    pytest.importorskip("trl")
    monkeypatch.setattr(ldfa_hf.pretrained, "smollm2_path", lambda *a, **k: tiny_chat_llama_folder)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippets()["reward"], scope)
    assert scope["trainer"].state.global_step == 10 and scope["plugin"].num_steps == 10
    assert "classification head: base_model.model.score.modules_to_save.default" in scope["plugin"].summary(print_fn=None)
    assert {"accuracy", "margin"} <= set(next(h for h in scope["trainer"].state.log_history if "loss" in h))
