"""Evaluation and calibration text: a local file, a name for a shared or hub dataset, or the sample
shipped in the package; plus the fingerprint that pins a tokenized text to a run."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from pathlib import Path

import torch

from ..errors import LatentKVError

# Short names for the datasets people evaluate KV compression on: (dataset, config, split, column).
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2-valid": ("wikitext", "wikitext-2-raw-v1", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
}

# The shared reference copies, relative to the `shared/` folder beside a checkout (used when present).
LOCAL_REFERENCE = {
    "wikitext2": "data/wikitext-2-raw/wiki.test.raw",
    "wikitext2-valid": "data/wikitext-2-raw/wiki.valid.raw",
    "ptb": "data/ptb/ptb.test.txt",
}

# Texts inside the package, so a wheel calibrates with nothing else on the machine (provenance in
# latentkv/data/README.md: public-domain Project Gutenberg prose, never evaluation text).
PACKAGED = {"calib-sample": "calib-sample.txt"}

# Held-out tails: the last ~HELDOUT_BYTES of a validation text (from its first article heading there on) are
# never calibrated or healed on (`io.domains`), so settings and recipes are chosen on text no run has seen.
HELDOUT = {"wikitext2-heldout": "wikitext2-valid"}
HELDOUT_BYTES = 200_000  # ~45k SmolLM2 tokens of WikiText-2 valid: 16 windows of 2048 and some to spare
_ARTICLE = re.compile(r"\n = [^=\n][^\n]* = \n")  # WikiText's top-level heading line, " = Title = "

OFFLINE_CALIB = "calib-sample"  # fiction to calibrate on when the Gutenberg corpus is not here

TEST_SPLITS = ("wikitext2", "ptb")
TEST_FILES = ("wiki.test.raw", "wiki.test.tokens", "ptb.test.txt")


def shared_file(name: str) -> Path | None:
    """The local copy of a named text, looked up from the working dir and from the checkout."""
    path = shared_path(LOCAL_REFERENCE[name])
    return path if path is not None and path.is_file() else None


def shared_path(relative: str) -> Path | None:
    """`shared/relative` beside the working dir or beside the checkout, if it exists."""
    for shared in (Path("../shared"), Path(__file__).resolve().parents[3] / "shared"):
        if (shared / relative).exists():
            return shared / relative
    return None


def packaged_file(name: str) -> Path:
    return Path(str(files("latentkv") / "data" / PACKAGED[name]))


def load_text(source: str | Path) -> str:
    """A path (UTF-8 text file), a name in DATASETS ('wikitext2', 'ptb', ...) or in PACKAGED -> the text.

    A named dataset uses the shared local copy when it exists, else `datasets` (needs the hub).
    """
    src = str(source)
    path = Path(src).expanduser()
    if src in HELDOUT and not path.exists():
        tail = split_heldout(load_text(HELDOUT[src]))[1]
        if not tail:
            raise LatentKVError(f"{HELDOUT[src]} is too short to hold out {src} ({2 * HELDOUT_BYTES} characters "
                                f"needed); choose settings on {HELDOUT[src]} or your own file")
        return tail
    if src in PACKAGED and not path.exists():
        return _read_file(packaged_file(src))
    if src in DATASETS and not path.exists():
        local = shared_file(src)
        return _read_file(local) if local is not None else _load_dataset(src)
    return _read_file(path)


def split_heldout(text: str, size: int = HELDOUT_BYTES) -> tuple[str, str]:
    """A validation text -> (the part calibration and healing read, the held-out tail for choosing settings).

    The tail starts at the first article heading in the last `size` characters (else at a line break there),
    so both parts hold whole articles; a text shorter than 2 * size keeps no tail (everything is readable)."""
    if len(text) < 2 * size:
        return text, ""
    start = len(text) - size
    found = _ARTICLE.search(text, start)
    cut = found.start() if found else max(text.find("\n", start), start)
    return text[:cut], text[cut:]


def check_not_test_split(source: str | Path) -> None:
    """The WikiText-2 and PTB test texts are for evaluation only, held-out tails for choosing settings;
    calibrating on either would leak."""
    name = Path(str(source)).name
    if str(source) in HELDOUT:
        raise LatentKVError(f"{source} is held out for choosing settings and must not be calibrated on; use the "
                            f"default mixture (--calib mix) or {HELDOUT[str(source)]}")
    if str(source) in TEST_SPLITS or name in TEST_FILES:
        raise LatentKVError(f"{source} is an evaluation (test) split and must not be used for calibration; "
                            "use the default mixture (--calib mix), wikitext2-valid or your own text")


def fingerprint(ids: torch.Tensor) -> str:
    """A short hash of token ids (any shape): runs and caches refuse to resume on other data."""
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def _read_file(path: Path) -> str:
    if not path.is_file():
        names = ", ".join([*DATASETS, *HELDOUT, *PACKAGED])
        raise LatentKVError(f"text file {path} not found; pass an existing UTF-8 file or one of: {names}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LatentKVError(f"text file {path} is not UTF-8 (bad byte at offset {e.start}); convert it with "
                            f"`iconv -t utf-8`") from None
    if not text.strip():
        raise LatentKVError(f"text file {path} is empty; pass a file with text in it")
    return text


def _load_dataset(name: str) -> str:
    dataset, config, split, column = DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise LatentKVError(f"{name!r} needs the `datasets` package (pip install 'latentkv[datasets]') "
                            f"or a local file path") from None
    try:
        rows = datasets.load_dataset(dataset, config, split=split)[column]
    except Exception as e:  # hub/network errors come in many types
        raise LatentKVError(f"could not load dataset {dataset}/{config} ({type(e).__name__}); "
                            "the hub is unreachable: pass a local text file instead") from None
    return "\n".join(rows)
