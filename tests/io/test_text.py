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
