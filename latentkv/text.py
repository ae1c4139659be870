"""Evaluation/calibration text: a local file, or a named HF dataset split when reachable."""

from __future__ import annotations

from pathlib import Path

from .errors import LatentKVError

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


def shared_file(name: str) -> Path | None:
    """The local copy of a named text, looked up from the working dir and from the checkout."""
    for shared in (Path("../shared"), Path(__file__).resolve().parents[2] / "shared"):
        if (shared / LOCAL_REFERENCE[name]).is_file():
            return shared / LOCAL_REFERENCE[name]
    return None


def load_text(source: str | Path) -> str:
    """A path (UTF-8 text file), or a name in DATASETS ('wikitext2', 'ptb', ...) -> the text.

    A named dataset uses the shared local copy when it exists, else `datasets` (needs the hub).
    """
    src = str(source)
    path = Path(src).expanduser()
    if src in DATASETS and not path.exists():
        local = shared_file(src)
        return _read_file(local) if local is not None else _load_dataset(src)
    return _read_file(path)


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise LatentKVError(f"text file {path} not found; pass an existing UTF-8 file or one of: {', '.join(DATASETS)}")
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
