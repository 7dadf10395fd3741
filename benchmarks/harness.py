"""What every accuracy experiment shares: the methods, a training loop, resumable result tables, plots.

A *method* is a name from ``METHODS`` plus a rank: ``bp`` trains the model unwrapped (plain
autograd), every other name is an ``LDFAConfig.rule`` — the LDFA rules at a rank sweep, the
``fixed`` low-rank ablation, and the full-rank ``fa`` / ``dfa`` baselines.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

import ldfa_hf
from ldfa_hf.demo import fit
from ldfa_hf.rules import RULES, rule_class

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def out_path(given: str | None, filename: str, tiny: bool) -> str:
    """Where a benchmark writes: ``given``, else the committed results folder; a tiny (smoke) run
    never writes there by default, it gets a fresh temporary folder."""
    if given:
        return given
    if tiny:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="ldfa_tiny_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        print(f"--tiny: writing to {folder} (removed when this program exits; --out PATH keeps the results)")
        return os.path.join(folder, filename)
    return os.path.join(RESULTS, filename)
# "bp" here is the model as it is (plain autograd); every other name is an LDFAConfig.rule
LABELS = {"bp": "backprop", **{name: rule.label for name, rule in RULES.items() if name != "bp"}}
METHODS = tuple(LABELS)


def method_cells(ranks: Iterable[int], headline_rank: int) -> list[tuple[str, int, bool]]:
    """(method, rank, headline) for a rank sweep: references, svd at every rank, the other rules at the headline rank."""
    cells = [("bp", 0, True), ("fa", 0, True), ("dfa", 0, True)]
    cells += [("svd", r, r == headline_rank) for r in ranks]
    if headline_rank in ranks:
        cells += [("local", headline_rank, False), ("oja", headline_rank, False), ("calibrated", headline_rank, False),
                  ("fixed", headline_rank, True)]
    return cells


def attach(model: nn.Module, method: str, rank: int, seed: int, refresh_every: int | None, **config):
    """Wrap ``model`` for ``method`` (None for ``bp``: backprop is the model as it is)."""
    if method == "bp":
        return None
    if "refresh_every" in rule_class(method).settings:  # the rules that refresh from W
        config["refresh_every"] = refresh_every
    with warnings.catch_warnings():  # svd on a LoRA base is measured on purpose (the tables show it fail)
        warnings.filterwarnings("ignore", "LDFA rule='svd' on a model whose targeted weights", ldfa_hf.LDFAWarning)
        return ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule=method, rank=max(rank, 1), seed=seed, **config))


def logits_of(output) -> torch.Tensor:
    return getattr(output, "logits", output)


def train_classifier(model: nn.Module, train: tuple, test: tuple, method: str, rank: int, seed: int, epochs: int,
                     batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4, **config) -> dict:
    """Train with AdamW and cross-entropy; LDFA refreshes its SVD every half epoch (as the authors do).

    Returns test accuracy, the per-step training losses, the median step time (after five
    warm-up steps) and the plugin (None for bp).
    """
    (x_train, y_train), (x_test, y_test) = train, test
    steps_per_epoch = len(y_train) // batch_size
    plugin = attach(model, method, rank, seed, refresh_every=max(1, steps_per_epoch // 2), **config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    (curve,), (step_s,) = fit([(model, optimizer, plugin)], x_train, y_train, epochs, batch_size, seed)
    return {"accuracy": accuracy(model, x_test, y_test), "curve": curve, "step_s": statistics.median(step_s[5:] or step_s),
            "plugin": plugin}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Test accuracy through the package's offline ``evaluate`` metric."""
    from ldfa_hf.metrics import Accuracy

    metric = Accuracy()
    was_training = model.training
    model.eval()
    for i in range(0, len(y), batch_size):
        metric.add_batch(predictions=logits_of(model(x[i:i + batch_size])).argmax(-1), references=y[i:i + batch_size])
    model.train(was_training)
    return metric.compute()["accuracy"]


def row_key(row: dict, columns: list[str]) -> tuple:
    """A row's ``columns`` as strings; a column the row's file did not have yet counts as blank."""
    return tuple("" if row.get(k) is None else str(row[k]) for k in columns)


class ResultTable:
    """A CSV of finished cells: a re-run skips every cell already in it, so long sweeps can be interrupted."""

    def __init__(self, path: str, fields: list[str], key: list[str]) -> None:
        self.path, self.fields, self.key = path, fields, key
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.rows = list(reader)
                header = reader.fieldnames or []
            if header != fields:  # columns added since the file was written: rewrite it with blanks
                self.rows = [{k: r.get(k) or "" for k in fields} for r in self.rows]
                self.rewrite()

    def rewrite(self) -> None:
        """Write every row again (after columns were added or a derived column recomputed).

        Rows another process appended since this table was read are kept: a recompute running
        beside a sweep must not drop the sweep's new cells.
        """
        if os.path.exists(self.path):
            with open(self.path, newline="") as fh:
                have = {self._key(r) for r in self.rows}
                self.rows += [{k: r.get(k) or "" for k in self.fields} for r in csv.DictReader(fh)
                              if self._key(r) not in have]
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def _key(self, row: dict) -> tuple:
        return row_key(row, self.key)

    def missing(self, cells: list[dict]) -> list[dict]:
        have = {self._key(r) for r in self.rows}
        return [c for c in cells if self._key(c) not in have]

    def add(self, row: dict) -> None:
        new_file = not os.path.exists(self.path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow({k: row[k] for k in self.fields})
        self.rows.append({k: str(row[k]) for k in self.fields})

    def run(self, cells: list[dict], fn: Callable[[dict], dict], desc: str) -> list[dict]:
        """Run ``fn(cell) -> measurements`` for every missing cell, appending each row as soon as it is done."""
        from tqdm import tqdm

        for cell in tqdm(self.missing(cells), desc=desc):
            start = time.perf_counter()
            row = dict(cell, **fn(cell))
            row.setdefault("seconds", f"{time.perf_counter() - start:.1f}")
            self.add(row)
        return self.rows

    def select(self, **where) -> list[dict]:
        return select(self.rows, **where)


def select(rows: list[dict], **where) -> list[dict]:
    """Rows whose columns equal ``where`` (CSV values are strings, so ``rank=10`` matches ``"10"``)."""
    return [r for r in rows if all(r[k] == str(v) for k, v in where.items())]


def mean_of(rows: list[dict], column: str, **where) -> tuple[float, int] | tuple[None, int]:
    values = [float(r[column]) for r in select(rows, **where)]
    return (statistics.mean(values) if values else None), len(values)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_rank_sweep(rows: list[dict], path: str, title: str, column: str = "test_accuracy", scale: float = 100.0,
                    ylabel: str = "test accuracy (%)", headline_rank: int | None = None) -> str:
    """svd's metric vs rank, other rules as markers at their rank, bp/fa/dfa as horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ranks = sorted({int(r["rank"]) for r in rows if r["method"] == "svd"})
    if ranks:
        ax.plot(ranks, [scale * mean_of(rows, column, method="svd", rank=k)[0] for k in ranks], "o-", label="LDFA (svd)")
    for method, style in (("local", "s"), ("oja", "^"), ("calibrated", "D"), ("fixed", "x")):
        for k in sorted({int(r["rank"]) for r in rows if r["method"] == method}):
            ax.plot([k], [scale * mean_of(rows, column, method=method, rank=k)[0]], style,
                    label=f"{LABELS[method]} r={k}", markersize=8)
    for method, color in (("bp", "k"), ("fa", "tab:red"), ("dfa", "tab:purple")):
        value, n = mean_of(rows, column, method=method)
        if n:
            ax.axhline(scale * value, color=color, ls="--", lw=1, label=LABELS[method])
    if headline_rank:
        ax.axvline(headline_rank, color="grey", lw=0.5)
    ax.set_xscale("log")
    ticks = sorted({int(r["rank"]) for r in rows if int(r["rank"]) > 0})
    if ticks:
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
    _label(ax, title, "feedback rank r", ylabel)
    return save_figure(fig, path)


def plot_curves(curves: dict[str, list], path: str, title: str, ylabel: str = "training loss",
                xlabel: str = "training step", window: int = 20) -> str:
    """Moving-average curves, one per label; values are y's, or (x, y) pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, values in curves.items():
        xs, ys = zip(*values) if values and isinstance(values[0], tuple) else (range(len(values)), values)
        smooth = [statistics.mean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, label=label, lw=1.2)
    _label(ax, title, xlabel, ylabel)
    return save_figure(fig, path)


def summary_table(rows: list[dict], cells: list[tuple[str, int, bool]], column: str = "test_accuracy",
                  scale: float = 100.0, unit: str = "%", digits: int = 2) -> str:
    """Markdown-ish console table: mean over seeds and its difference from bp."""
    bp, _ = mean_of(rows, column, method="bp")
    lines = [f"{'method':<16} {'rank':>5} {column + ' (mean)':>22} {'sd':>7} {'vs bp':>8} {'seeds':>6}"]
    for method, rank, _ in cells:
        values = [float(r[column]) for r in select(rows, method=method, rank=rank)]
        if values:
            value = statistics.mean(values)
            sd = f"{scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            delta = "" if bp is None or method == "bp" else f"{scale * (value - bp):+.{digits}f}"
            lines.append(f"{LABELS[method]:<16} {rank or '—':>5} {scale * value:>21.{digits}f}{unit} {sd:>7} {delta:>8} "
                         f"{len(values):>6}")
    return "\n".join(lines)
