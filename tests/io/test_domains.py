"""Domain texts: evaluation and calibration parts never share a document, and both are stable."""

import re

import pytest

from latentkv.errors import LatentKVError
from latentkv.io.domains import CALIB_DOMAINS, DEV_DOMAINS, FICTION_EVAL, PART_BYTES, domain_text


def headers(text: str) -> set[str]:
    return set(re.findall(r"^(# [\w.-]+|pg\d+_[\w-]+\.txt)$", text, flags=re.M))


@pytest.mark.parametrize("domain", ["fiction", "code", "docs"])
def test_eval_and_calib_parts_share_no_document(domain):
    ev, cal = domain_text(domain, "eval"), domain_text(domain, "calib")
    assert headers(ev) and headers(cal) and not headers(ev) & headers(cal)
    assert len(ev) <= PART_BYTES and len(cal) <= PART_BYTES
    assert domain_text(domain, "eval") == ev  # read again: the same text


def test_fiction_evaluation_books_are_the_held_out_ones():
    assert {h for h in headers(domain_text("fiction", "eval"))} == set(FICTION_EVAL)
    assert not set(FICTION_EVAL) & headers(domain_text("fiction", "calib"))


def test_test_splits_are_never_calibration_parts():
    assert domain_text("wikitext2", "calib") != domain_text("wikitext2", "eval")
    with pytest.raises(LatentKVError, match="only a test split"):
        domain_text("ptb", "calib")
    assert "ptb" not in CALIB_DOMAINS and set(CALIB_DOMAINS) < set(DEV_DOMAINS)


def test_healing_mixture_holds_no_evaluation_document():
    from latentkv.healing.data import read_documents

    text = "\n".join(read_documents("mix"))
    for domain in ("fiction", "code", "docs"):
        assert headers(domain_text(domain, "calib")) <= headers(text)
        assert not headers(domain_text(domain, "eval")) & headers(text)
    assert domain_text("wikitext2", "eval")[:3000] not in text
