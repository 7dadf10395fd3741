"""`evaluate` metrics that work offline (``evaluate.load("accuracy")`` needs the Hub).

    >>> from ldfa_hf.metrics import Accuracy, Perplexity, GradientAngle
    >>> Accuracy().compute(predictions=[1, 2, 2], references=[1, 2, 0])
    {'accuracy': 0.6666666666666666}
    >>> GradientAngle().compute(predictions=[[1.0, 0.0]], references=[[1.0, 1.0]])
    {'angle': 45.0}

Needs the ``bench`` extra (``evaluate`` and ``datasets``).
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np

_CITATION = """@article{hanut2025ldfa, title={Training Large Neural Networks With Low-Dimensional Error Feedback},
author={Hanut, Maher and Kadmon, Jonathan}, journal={arXiv:2502.20580}, year={2025}}"""


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of correct predictions.", citation="", inputs_description="int labels",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


class Perplexity(evaluate.Metric):
    """``exp`` of the token-weighted mean negative log-likelihood.

    ``predictions``: mean NLL (nats) of each batch; ``references``: its number of tokens.
    """

    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity from per-batch mean cross-entropy and token counts.", citation="",
            inputs_description="predictions: mean NLL per batch; references: tokens per batch",
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        nll, tokens = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        mean = float((nll * tokens).sum() / tokens.sum())
        return {"perplexity": math.exp(mean), "loss": mean}


class GradientAngle(evaluate.Metric):
    """Mean angle (degrees) between LDFA's and backprop's gradient vectors, row by row.

    ``predictions``: LDFA gradients; ``references``: backprop gradients (flattened). Rows
    are typically layers, e.g. from ``LDFAPlugin.stats(batch)`` probes.
    """

    def _info(self):
        return evaluate.MetricInfo(
            description="Angle between an approximate and the exact gradient.", citation=_CITATION,
            inputs_description="two float vectors per row",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, references):
        angles = []
        for p, r in zip(predictions, references):
            p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
            cos = float(p @ r / (np.linalg.norm(p) * np.linalg.norm(r) + 1e-300))
            angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
        return {"angle": float(np.mean(angles)) if angles else float("nan")}
