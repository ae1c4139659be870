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
| docs | long descriptions (READMEs) of the installed packages, latentkv's own excluded | names hashing even | odd |

A document is split by a stable hash of its name (sha1, so every machine splits alike), and each
part is capped (DOC_BYTES per document, PART_BYTES in all) so that no single file dominates.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sysconfig
from pathlib import Path

from ..errors import LatentKVError
from .text import OFFLINE_CALIB, load_text, shared_path, split_heldout

DEV_DOMAINS = ("wikitext2", "ptb", "fiction", "code", "docs")
CALIB_DOMAINS = ("wikitext2", "fiction", "code", "docs")  # PTB has no split to calibrate on
# Held out of calibration and healing; none of them is in the packaged calib-sample either.
FICTION_EVAL = ("pg02701_melville_moby-dick.txt", "pg00174_wilde_picture-of-dorian-gray.txt",
                "pg00120_stevenson_treasure-island.txt")
CORPUS = "data/corpus"
DOC_BYTES = 12_000  # at most this much of one file or package description
PART_BYTES = 160_000  # at most this much text per domain and part (~40k tokens)
MIN_DOC_BYTES = 2_000  # shorter package descriptions are boilerplate, not documentation


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
    return _joined(((f"# {n}", bodies[n]) for n in documents("docs", part)), size)


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
    return sorted(n for n in names if _half(n) == part)


def _package_docs() -> dict[str, str]:
    """Installed package name -> its long description (latentkv's own and short ones left out)."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get("Description") or dist.metadata.get_payload() or ""
        if name and name != "latentkv" and len(body) >= MIN_DOC_BYTES:
            seen.setdefault(name, body)
    return seen


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
