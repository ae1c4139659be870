"""Domain texts: evaluation and calibration parts never share a document, and both are stable."""

import email.message
import importlib.metadata
import logging
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from latentkv.errors import LatentKVError
from latentkv.io import domains
from latentkv.io.domains import CALIB_DOMAINS, DEV_DOMAINS, FICTION_EVAL, PART_BYTES, documents, domain_text

NAMED = ("fiction", "code", "docs")


def header(domain: str, name: str) -> str:
    """The line a document starts with inside its domain's text."""
    return f"\n{name}\n\n" if domain == "fiction" else f"\n# {name}\n\n"


@pytest.mark.parametrize("domain", NAMED)
def test_eval_and_calib_parts_share_no_document(domain):
    ev, cal = documents(domain, "eval"), documents(domain, "calib")
    assert ev and cal and not set(ev) & set(cal)
    text = "\n" + domain_text(domain, "eval")
    assert header(domain, ev[0]) in text and not any(header(domain, n) in text for n in cal)
    assert len(text) <= PART_BYTES + 1 and domain_text(domain, "eval") == text[1:]  # read again: the same


def test_fiction_evaluation_books_are_the_held_out_ones():
    assert documents("fiction", "eval") == sorted(FICTION_EVAL)
    assert not set(FICTION_EVAL) & set(documents("fiction", "calib"))


def test_test_splits_are_never_calibration_parts():
    assert domain_text("wikitext2", "calib") != domain_text("wikitext2", "eval")
    with pytest.raises(LatentKVError, match="only a test split"):
        domain_text("ptb", "calib")
    assert "ptb" not in CALIB_DOMAINS and set(CALIB_DOMAINS) < set(DEV_DOMAINS)


def test_healing_mixture_holds_no_evaluation_document():
    from latentkv.healing.data import read_documents

    text = "\n" + "\n".join(read_documents("mix"))
    for domain in NAMED:
        assert header(domain, documents(domain, "calib")[0]) in text
        assert not any(header(domain, n) in text for n in documents(domain, "eval"))
    assert domain_text("wikitext2", "eval")[:3000] not in text


class FakeDist:
    """What `_package_docs` reads of an installed distribution: its metadata's Name and Description."""

    def __init__(self, name: str, body: str):
        self.metadata = email.message.Message()
        self.metadata["Name"] = name
        self.metadata.set_payload(body)


def test_every_docs_package_is_pinned_by_make_install():
    """The docs text is these packages' READMEs: `make install` must fix their versions, or a release moves it."""
    pins = {}
    for name in ("cpu.txt", "lock.txt"):
        for line in (Path(__file__).resolve().parents[2] / "constraints" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                req = Requirement(line)
                assert canonicalize_name(req.name) not in pins, f"{req.name} pinned twice"  # torch: cpu.txt only
                pins[canonicalize_name(req.name)] = req.specifier
    assert sorted(domains.DOCS_PACKAGES - set(pins)) == []
    assert all(len(spec) == 1 and next(iter(spec)).operator == "==" and "*" not in str(spec) for spec in pins.values())


def test_docs_text_ignores_packages_outside_the_list_and_notes_missing_ones(monkeypatch, caplog):
    real, heal = list(importlib.metadata.distributions()), domains.HEAL_BYTES
    before = {part: (domain_text("docs", part), domain_text("docs", part, heal)) for part in ("eval", "calib")}
    long_readme = "A linter nobody calibrates on.\n" * (domains.MIN_DOC_BYTES // 10)
    # a package outside DOCS_PACKAGES, in either name hash half, changes nothing
    extra = [FakeDist(n, long_readme) for n in ("Ruff", "black", "mypy", "some_tool")]
    assert not {d.metadata["Name"].lower() for d in extra} & domains.DOCS_PACKAGES
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(real + extra))
    assert {p: (domain_text("docs", p), domain_text("docs", p, heal)) for p in before} == before
    # a listed package that is missing here leaves the docs text and is named in a note
    present = {d.metadata["Name"].lower() for d in real} & {"rich", "tqdm"}
    gone = [d for d in real if d.metadata["Name"].lower() not in present]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(gone + extra))
    with caplog.at_level(logging.INFO, logger="latentkv"):
        text = "\n" + domain_text("docs", "eval", heal) + "\n" + domain_text("docs", "calib", heal)
    assert present and set(domains.package_docs_missing()) >= present
    assert all(f"\n# {n}\n\n" in "\n" + before["eval"][1] + "\n" + before["calib"][1] for n in present)
    assert not any(f"\n# {n}\n\n" in text for n in present)
    assert "DOCS_PACKAGES are not installed here" in caplog.text
