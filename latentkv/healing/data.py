"""Training text for healing: documents -> one token stream -> fixed-length packed sequences.

Sources: a UTF-8 text file, a folder of `.txt` files (sorted, recursive), `mix` (every domain's
calibration part, `io.domains.healing_mixture`: never an evaluation document), a `datasets` dataset
object, `hf:NAME[:CONFIG]:SPLIT[:COLUMN]` (streamed through `datasets`, `streaming=True`, and read
only as far as the run needs: `pack(..., max_windows)`; NAME may be a local dataset folder; under several
processes each reads its own shard, `datasets.distributed.split_dataset_by_node`), or any iterable of
strings.
Documents are joined with the tokenizer's EOS token and cut into `seq_len` windows; the order
in which windows are visited is a seeded permutation per epoch, so the position in the stream
is one integer (the number of windows consumed) and a resumed run sees the same windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..conversion.mixture import MIX
from ..errors import LatentKVError
from ..io.domains import healing_mixture


def read_documents(source, shard: tuple[int, int] | None = None) -> Iterable[str]:
    """source (path, folder, `mix`, `hf:` spec, `datasets.Dataset` or iterable of str) -> documents
    (a list, or a lazy stream for `hf:` specs). shard (rank, world): an `hf:` stream's part for one
    process (whole files when they divide evenly, else every world-th example); other sources ignore it."""
    if isinstance(source, (str, Path)):
        src = str(source)
        if src.startswith("hf:"):
            return _hub_documents(src, shard)
        if src == MIX and not Path(src).exists():
            return healing_mixture()
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise LatentKVError(f"data folder {path} holds no .txt files; put UTF-8 .txt files in it")
            return [_read(p) for p in files]
        if path.is_file():
            return [_read(path)]
        raise LatentKVError(f"data {src!r} not found: pass a text file, a folder of .txt files, "
                            "or hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    if hasattr(source, "column_names"):  # a datasets.Dataset
        column = "text" if "text" in source.column_names else source.column_names[0]
        return [str(t) for t in source[column]]
    return [str(t) for t in source]


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LatentKVError(f"data file {path} is not UTF-8 (bad byte at offset {e.start}); "
                            "convert it with `iconv -t utf-8`") from None


def is_stream(source) -> bool:
    return isinstance(source, (str, Path)) and str(source).startswith("hf:")


def _hub_documents(spec: str, shard: tuple[int, int] | None = None) -> Iterator[str]:
    parts = spec[3:].split(":")
    if len(parts) < 2:
        raise LatentKVError(f"bad dataset spec {spec!r}; write hf:NAME[:CONFIG]:SPLIT[:COLUMN], "
                            "e.g. hf:wikitext:wikitext-103-raw-v1:train:text")
    name, rest = parts[0], parts[1:]
    config = (rest.pop(0) or None) if len(rest) >= 2 else None  # hf:NAME::SPLIT:COLUMN leaves it out
    split, column = rest[0], (rest[1] if len(rest) > 1 else "text")
    try:
        import datasets
    except ImportError:
        raise LatentKVError("hf: data needs the `datasets` package (pip install 'latentkv[datasets]')") from None
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        if shard is not None and shard[1] > 1:
            from datasets.distributed import split_dataset_by_node

            rows = split_dataset_by_node(rows, rank=shard[0], world_size=shard[1])
        first = next(iter(rows))
    except StopIteration:
        raise LatentKVError(f"dataset {name} ({split}) is empty; pick another split or dataset") from None
    except Exception as e:  # hub/network errors come in many types
        raise LatentKVError(f"could not load dataset {name} ({type(e).__name__}); the hub may be unreachable: "
                            "pass a local text file or folder") from None
    if column not in first:
        raise LatentKVError(f"dataset {name} has no column {column!r}; it has {sorted(first)}")
    return (str(row[column]) for row in rows)


def pack(tokenizer, documents: Iterable[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """documents -> (N, seq_len) long: EOS-joined token stream cut into windows, tail dropped; with
    `max_windows`, the documents are read only until that many windows are full."""
    if tokenizer.eos_token_id is None:
        raise LatentKVError("the tokenizer has no EOS token to separate documents; use a tokenizer with one")
    ids: list[int] = []
    for doc in documents:
        if doc.strip():
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise LatentKVError(f"the training data is empty or shorter than one sequence ({len(ids)} tokens < "
                            f"--seq-len {seq_len}); give more text or a shorter --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def check_copy_share(share: float, flag: str = "--copy-share") -> None:
    """The one check of a drill share: HealConfig runs it before any model loads, plant_copies for library callers."""
    if not 0 <= share < 1:
        raise LatentKVError(f"{flag} {share}: give the fraction of windows to plant copies in, in [0, 1) "
                            "(e.g. 0.1)")


def plant_copies(windows: torch.Tensor, share: float, seed: int, vocab: int, special=(), max_length: int = 0,
                 min_gap: int = 0, flag: str = "--copy-share") -> torch.Tensor:
    """(N, T) packed windows -> a copy where round(share * N) of them (a seeded choice) carry a copy drill: a span
    of random token ids planted at a random place and planted again later in the same window, natural text before,
    between and after. Nothing but the context predicts the second span, and the teacher copies it, so distilling
    on these windows trains the induction circuits that a narrow latent loses first (prose perplexity barely uses
    them; copying identifiers, code and retrieved facts is all they do). Span ids are uniform over [0, vocab)
    minus `special`; lengths (8 to T/4, or to `max_length`), gaps (at least `min_gap`) and places vary per
    window."""
    check_copy_share(share, flag)
    n, t = windows.shape
    count = round(share * n)
    if count == 0:
        return windows
    if t < 8:
        raise LatentKVError(f"--seq-len {t} is too short to plant a copy drill in; use windows of 8+ tokens")
    g = torch.Generator().manual_seed(seed * 1_000_003 + 271_828)
    ids = torch.tensor(sorted(set(range(vocab)) - {int(x) for x in special}), dtype=windows.dtype)
    out = windows.clone()
    lo, hi = max(2, min(8, t // 8)), max(2, t // 4)
    hi = max(lo, min(hi, max_length or hi, (t - min_gap) // 2))
    if t - 2 * lo < min_gap:
        raise LatentKVError(f"windows of {t} tokens cannot hold two {lo}-token spans {min_gap} tokens apart; "
                            "use longer windows")
    for w in torch.randperm(n, generator=g)[:count].tolist():
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        gap = int(torch.randint(min_gap, t - 2 * length + 1, (1,), generator=g))
        start = int(torch.randint(0, t - 2 * length - gap + 1, (1,), generator=g))
        span = ids[torch.randint(0, len(ids), (length,), generator=g)]
        out[w, start:start + length] = span
        out[w, start + length + gap:start + 2 * length + gap] = span
    return out


LONG_DRILL_MAX_LENGTH = 32  # passkeys and identifiers are short; a long span would mostly drill the first copy


def plant_long_copies(windows: torch.Tensor, long_seq_len: int, share: float, seed: int, vocab: int,
                      special=()) -> torch.Tensor:
    """(N, T) packed windows -> a copy where round(share * M) of the M long windows (the same stream cut
    `long_seq_len` long, as the long steps read it) carry a long-range copy drill: spans of 8 to 32 random ids
    at least a quarter window apart. The short drills stay within a short window, so nothing else trains copying
    across thousands of tokens (measured: copy probe 35.6 -> 44.7 %; the depth-0 passkey is not a matter of distance
    and stays missed, BENCHMARKS.md "Long-range copy drills"). The short windows holding a long drill's span see it
    as random text."""
    if share == 0:
        return windows
    long = cut_long(windows, long_seq_len)
    planted = plant_copies(long, share, seed + 1, vocab, special, max_length=LONG_DRILL_MAX_LENGTH,
                           min_gap=long_seq_len // 4, flag="--long-copy-share")
    return torch.cat([planted.flatten(), windows.flatten()[long.numel():]]).view_as(windows)


def cut_long(windows: torch.Tensor, long_seq_len: int) -> torch.Tensor:
    """(N, seq_len) packed windows -> (M, long_seq_len): the same token stream cut longer, the tail that fills no
    long window left out (a view: the long steps read these, the long drills are planted in them)."""
    m = windows.numel() // long_seq_len
    return windows.flatten()[: m * long_seq_len].view(m, long_seq_len)


class WindowOrder:
    """Which packed windows a global step uses: epoch-wise seeded permutations of range(N)."""

    def __init__(self, n_windows: int, seed: int):
        self.n, self.seed, self._perms = n_windows, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Window indices for stream positions [start, start + count) -> (count,) long."""
        pos = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in pos])
