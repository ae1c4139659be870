"""Healing data: hf: specs stream through `datasets` and are read only as far as the run needs."""

import pytest

from latentkv.errors import LatentKVError
from latentkv.healing.data import is_stream, pack, read_documents


@pytest.fixture
def local_dataset(tmp_path):
    """A local dataset folder (the `text` builder: one document per line), read offline by `datasets`."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.txt").write_text("\n".join(f"document number {i} says the quick brown fox jumps" for i in range(500)))
    return d


def test_hf_spec_streams_and_stops_at_the_windows_needed(local_dataset, tiny_tokenizer):
    spec = f"hf:{local_dataset}:train"
    assert is_stream(spec) and not is_stream(str(local_dataset))
    seen = []

    def counted(docs):
        for doc in docs:
            seen.append(doc)
            yield doc

    windows = pack(tiny_tokenizer, counted(read_documents(spec)), seq_len=16, max_windows=5)
    assert windows.shape == (5, 16)
    assert 0 < len(seen) < 50  # a handful of documents, not the 500 of the split
    whole = pack(tiny_tokenizer, read_documents(spec), seq_len=16)
    assert whole.shape[0] > 50 and (whole[:5] == windows).all()  # the same stream, read further


def test_bad_hf_column_is_one_line(local_dataset):
    with pytest.raises(LatentKVError, match="has no column 'body'"):
        read_documents(f"hf:{local_dataset}::train:body")


def test_each_process_reads_its_own_shard_of_a_stream(local_dataset):
    """Two processes' shards are disjoint and together the whole stream."""
    spec = f"hf:{local_dataset}:train"
    whole = list(read_documents(spec))
    parts = [list(read_documents(spec, shard=(k, 2))) for k in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)
    assert list(read_documents(spec, shard=(0, 1))) == whole
