"""Text sources: files (missing, empty, not UTF-8) and named datasets."""

import pytest

from latentkv.errors import LatentKVError
from latentkv.io.text import load_text, shared_file


def test_reads_utf8_file(tmp_path):
    (tmp_path / "t.txt").write_text("héllo world", encoding="utf-8")
    assert load_text(tmp_path / "t.txt") == "héllo world"


@pytest.mark.parametrize("content, match", [(None, "not found"), (b"", "empty"), (b"  \n", "empty"),
                                            (b"ok \xff\xfe bad", "not UTF-8")])
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LatentKVError, match=match):
        load_text(path)


def test_named_dataset_uses_shared_copy():
    local = shared_file("wikitext2")
    if local is None:
        pytest.skip("../shared/data not beside this checkout")
    assert load_text("wikitext2").startswith(local.read_text(encoding="utf-8")[:100])



def test_packaged_sample_is_calibration_text():
    from latentkv.io.text import OFFLINE_CALIB, check_not_test_split

    assert len(load_text(OFFLINE_CALIB)) > 100_000
    check_not_test_split(OFFLINE_CALIB)  # never evaluation text


def test_split_heldout_keeps_whole_articles():
    from latentkv.io.text import split_heldout

    articles = [f" = Title {i} = \n \n" + "word " * 400 + "\n" for i in range(40)]  # 40 x ~2 kB
    text = "".join(articles)
    rest, tail = split_heldout(text, size=10_000)
    assert rest + tail == text and 10_000 - 2_100 <= len(tail) <= 10_000
    assert tail.startswith("\n = Title ")  # cut at a heading, not inside an article
    assert split_heldout(text[:15_000], size=10_000) == (text[:15_000], "")  # too short: nothing held out


def test_wikitext2_heldout_is_never_calibrated_or_healed_on():
    from latentkv.healing.data import read_documents
    from latentkv.io.domains import domain_text
    from latentkv.io.text import check_not_test_split

    if shared_file("wikitext2-valid") is None:
        pytest.skip("../shared/data not beside this checkout")
    valid, tail = load_text("wikitext2-valid"), load_text("wikitext2-heldout")
    assert valid.endswith(tail) and 150_000 < len(tail) <= 200_000
    probe = tail[len(tail) // 2:][:2000]  # a passage from inside the tail
    assert probe in valid and probe not in domain_text("wikitext2", "calib", 10 ** 7)
    assert not any(probe in doc for doc in read_documents("mix"))
    with pytest.raises(LatentKVError, match="held out for choosing settings"):
        check_not_test_split("wikitext2-heldout")
