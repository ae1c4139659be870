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
