"""Text from several domains, split once into an evaluation part and a calibration/healing part.

Quality measured on encyclopedic prose alone hides what users see on code, documentation and
long-context text, so the dev suite and the default calibration both span domains. Every source
is local and read at run time; each domain's two parts never share a document:

| domain | source | evaluation part | calibration part |
|---|---|---|---|
| wikitext2 | WikiText-2 raw (`../shared` or the hub) | test | valid, less its held-out tail (`wikitext2-heldout`) |
| ptb | Penn Treebank (`../shared` or the hub) | test | none |
| fiction | Project Gutenberg books (`../shared/data/corpus`, else the packaged `calib-sample`) | FICTION_EVAL books | every other book |
| code | this Python's own standard library (`*.py` at its top level) | files whose name hashes even | odd |
| docs | long descriptions (READMEs) of the DOCS_PACKAGES installed here | names hashing even | odd |

A document is split by a stable hash of its name (sha1, so every machine splits alike), and each
part is capped (DOC_BYTES per document, PART_BYTES in all) so that no single file dominates.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import sysconfig
from pathlib import Path

from packaging.utils import canonicalize_name

from ..errors import LatentKVError
from .text import OFFLINE_CALIB, load_text, shared_path, split_heldout

log = logging.getLogger(__name__)

DEV_DOMAINS = ("wikitext2", "ptb", "fiction", "code", "docs")
CALIB_DOMAINS = ("wikitext2", "fiction", "code", "docs")  # PTB has no split to calibrate on
# Held out of calibration and healing; none of them is in the packaged calib-sample either.
FICTION_EVAL = ("pg02701_melville_moby-dick.txt", "pg00174_wilde_picture-of-dorian-gray.txt",
                "pg00120_stevenson_treasure-island.txt")
CORPUS = "data/corpus"
DOC_BYTES = 12_000  # at most this much of one file or package description
PART_BYTES = 160_000  # at most this much text per domain and part (~40k tokens)
MIN_DOC_BYTES = 2_000  # shorter package descriptions are boilerplate, not documentation
# The packages whose descriptions make the docs domain: those `make install` puts beside latentkv (its
# dependencies and its test extras') with one of MIN_DOC_BYTES or more, as of 2026-12. A fixed list, so
# that installing anything else (a linter, say) changes neither calibration nor healing text; a plain
# `pip install latentkv` has only part of it (see package_docs_missing). PEP 503 names.
DOCS_PACKAGES = frozenset('''
    absl-py accelerate aiohappyeyeballs aiohttp aiosignal annotated-doc annotated-types anyio attrs
    charset-normalizer cloudpickle colorama dataproperty datasets defusedxml dill evaluate fonttools frozenlist
    fsspec gguf grimp grpcio h11 hf-xet httpcore2 httpx2 huggingface-hub idna joblib lm-eval lxml markdown
    markdown-it-py matplotlib mbstrdecoder more-itertools mpmath multidict multiprocess narwhals networkx numpy
    packaging pandas pathvalidate peft pillow pip pluggy portalocker propcache psutil pyarrow pydantic
    pydantic-core pyparsing pytablewriter pytest python-dateutil pytz regex requests rich rouge-score sacrebleu
    scikit-learn scipy setuptools shellingham sortedcontainers sqlitedict sympy tabulate tcolorpy threadpoolctl
    tokenizers tomlkit torch tqdm transformers truststore typepy typer urllib3 werkzeug word2number xxhash
    yarl'''.split())


HEAL_BYTES = 2_000_000  # per domain in the healing mixture (~500k tokens): more text, same documents


def domain_text(domain: str, part: str, size: int = PART_BYTES) -> str:
    """The `part` ("eval" or "calib") of a domain in DEV_DOMAINS, as one text of at most `size` bytes."""
    if part not in ("eval", "calib"):
        raise ValueError(f"part must be eval or calib, got {part!r}")
    if domain not in READERS:
        raise LatentKVError(f"unknown domain {domain!r}; choose from {', '.join(READERS)}")
    return READERS[domain](part, size)


def healing_mixture() -> list[str]:
    """Healing text (`heal --data mix`): every domain's calibration part, up to HEAL_BYTES each, one
    document per domain; a domain missing here is left out. Never an evaluation document."""
    docs = []
    for name in CALIB_DOMAINS:
        try:
            docs.append(domain_text(name, "calib", HEAL_BYTES))
        except LatentKVError:
            continue
    if not docs:
        raise LatentKVError("no domain text is available here for `--data mix`; pass a text file or folder")
    return docs


def _wikitext2(part: str, size: int) -> str:
    if part == "eval":
        return load_text("wikitext2")[:size]
    return split_heldout(load_text("wikitext2-valid"))[0][:size]  # never the held-out tail (wikitext2-heldout)


def _ptb(part: str, size: int) -> str:
    if part != "eval":
        raise LatentKVError("PTB has only a test split here; it is for evaluation")
    return load_text("ptb")[:size]


def _fiction(part: str, size: int) -> str:
    corpus = shared_path(CORPUS)
    if corpus is None:
        if part == "eval":
            raise LatentKVError(f"the fiction evaluation books live in ../shared/{CORPUS}; it is not here")
        return load_text(OFFLINE_CALIB)[:size]
    books = documents("fiction", part)
    # from the middle of each book on (no front matter), an equal share of the part from each
    return _joined(((n, _middle((corpus / n).read_text(encoding="utf-8"))) for n in books), size, size // len(books))


def _code(part: str, size: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return _joined(((f"# {n}", (stdlib / n).read_text(encoding="utf-8", errors="replace"))
                    for n in documents("code", part)), size)


def _docs(part: str, size: int) -> str:
    bodies = _package_docs()
    return _joined(((f"# {n}", bodies[n]) for n in _in_part(bodies, part)), size)


def documents(domain: str, part: str) -> list[str]:
    """The names of the documents a part of `code`, `docs` or `fiction` is made of, in order."""
    if domain == "code":
        names = (p.name for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    elif domain == "docs":
        names = _package_docs()
    elif domain == "fiction":
        corpus = shared_path(CORPUS)
        return sorted(p.name for p in corpus.glob("*.txt") if (p.name in FICTION_EVAL) == (part == "eval")) \
            if corpus is not None else []
    else:
        raise ValueError(f"{domain} is not made of named documents")
    return _in_part(names, part)


def _in_part(names, part: str) -> list[str]:
    return sorted(n for n in names if _half(n) == part)


def _package_docs() -> dict[str, str]:
    """Package name (as the package spells it, lower case) -> its long description, for every installed
    package in DOCS_PACKAGES with one of at least MIN_DOC_BYTES."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get("Description") or dist.metadata.get_payload() or ""
        if canonicalize_name(name) in DOCS_PACKAGES and len(body) >= MIN_DOC_BYTES:
            seen.setdefault(name, body)
    _note_missing(tuple(package_docs_missing(seen)))
    return seen


@functools.cache  # once per process and set, not at every read of the domain
def _note_missing(missing: tuple[str, ...]) -> None:
    if missing:
        log.info("docs text: %d of the %d DOCS_PACKAGES are not installed here (e.g. %s), so calibration and "
                 "`--data mix` read less documentation than the benchmarks did; `pip install latentkv[test]` "
                 "installs them", len(missing), len(DOCS_PACKAGES), ", ".join(missing[:3]))


def package_docs_missing(found: dict[str, str] | None = None) -> list[str]:
    """The DOCS_PACKAGES names with no description here (not installed, or a short one), sorted."""
    names = {canonicalize_name(n) for n in (_package_docs() if found is None else found)}
    return sorted(DOCS_PACKAGES - names)


def _half(name: str) -> str:
    return "eval" if hashlib.sha1(name.encode()).digest()[0] % 2 == 0 else "calib"


def _middle(text: str) -> str:
    start = text.find("\n\n", len(text) // 3) + 2
    return text[start:]


def _joined(docs, size: int, doc_bytes: int = DOC_BYTES) -> str:
    """'header\\n\\nbody' pieces, each capped at doc_bytes (cut at a line end), the whole at `size`."""
    out, total = [], 0
    for head, body in docs:
        piece = body[:doc_bytes]
        piece = piece[: piece.rfind("\n") + 1] if "\n" in piece and len(body) > doc_bytes else piece
        out.append(f"{head}\n\n{piece.strip()}\n")
        total += len(out[-1])
        if total >= size:
            break
    if not out:
        raise LatentKVError("no documents found for this domain here")
    return "\n".join(out)[:size]


READERS = {"wikitext2": _wikitext2, "ptb": _ptb, "fiction": _fiction, "code": _code, "docs": _docs}
