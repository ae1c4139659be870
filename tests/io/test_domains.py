"""Domain texts: evaluation and calibration parts never share a document, and both are stable."""

import pytest

from latentkv.errors import LatentKVError
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
