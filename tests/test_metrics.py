"""The offline evaluate metrics, including the gradient-angle one."""

import math

import pytest

pytest.importorskip("evaluate")

from ldfa_hf.metrics import Accuracy, GradientAngle, Perplexity  # noqa: E402


def test_accuracy_batches():
    metric = Accuracy()
    metric.add_batch(predictions=[1, 2], references=[1, 0])
    metric.add_batch(predictions=[3, 3], references=[3, 3])
    assert metric.compute() == {"accuracy": 0.75}


def test_perplexity_weights_batches_by_tokens():
    result = Perplexity().compute(predictions=[1.0, 2.0], references=[30, 10])
    assert math.isclose(result["loss"], 1.25) and math.isclose(result["perplexity"], math.exp(1.25))


def test_gradient_angle():
    result = GradientAngle().compute(predictions=[[1.0, 0.0], [0.0, 2.0]], references=[[1.0, 1.0], [0.0, -1.0]])
    assert math.isclose(result["angle"], (45.0 + 180.0) / 2)
