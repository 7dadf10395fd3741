"""Every experiment and the demo run in a tiny mode (their numbers are not asserted here)."""

import os

from benchmarks import demo, speed


def test_demo_tiny_prints_table_and_writes_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    results = demo.main(["--tiny", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "backprop" in out and "LDFA svd r=10" in out and "speed-up" in out
    assert [r["method"] for r in results] == ["bp", "ldfa"]
    assert os.path.getsize(plot) > 1000


def test_speed_tiny_reports_ratios_and_memory(tmp_path, capsys):
    out_csv = tmp_path / "speed.csv"
    (result,) = speed.main(["--tiny", "--cases", "mlp", "--out", str(out_csv)])
    assert set(result["step_s"]) == {"backprop", "ldfa", "bp-rule"}
    assert result["speedup_ldfa"] > 0 and result["memory_bytes"]["backprop"] >= 0
    assert out_csv.read_text().startswith("case,device,rank")


def test_cli_dispatch(capsys):
    from ldfa_hf import cli

    cli.main(["bench", "teacher_student", "--tiny"])
    assert "svd" in capsys.readouterr().out


def test_speed_phases_tiny(capsys):
    (table,) = speed.main(["--tiny", "--cases", "mlp", "--phases"])
    assert set(table) == {"backprop", "ldfa"}
    for row in table.values():
        assert set(row) == {"forward", "backward", "optimizer", "plugin"} and all(t >= 0 for t in row.values())
    assert "ldfa" in capsys.readouterr().out


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
    assert {r["method"] for r in rows} == {"bp", "fa", "dfa", "svd", "local", "oja", "fixed"}
    assert os.path.getsize(str(out)[:-4] + ".png") > 1000
    lines = out.read_text().splitlines()
    mnist.main(["--tiny", "--out", str(out)])  # every cell is done: nothing is re-run
    assert out.read_text().splitlines() == lines
