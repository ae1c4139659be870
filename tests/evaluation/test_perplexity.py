"""Perplexity protocol: windows cover each token once; value matches a direct computation."""

import math

import pytest
import torch

from latentkv.errors import LatentKVError
from latentkv.evaluation.perplexity import perplexity, windows

from conftest import SAMPLE, make_tiny


@pytest.mark.parametrize("n, seq_len, stride", [(100, 16, None), (101, 16, None), (17, 16, None), (100, 16, 4),
                                                (100, 16, 16), (5, 16, None), (64, 8, 3)])
def test_windows_score_each_token_at_most_once(n, seq_len, stride):
    """Sliding windows score every token after the first; non-overlapping ones skip window starts."""
    scored = []
    for begin, end, first in windows(n, seq_len, stride):
        assert end - begin <= seq_len and begin < first <= end
        if stride is not None and begin > 0:
            assert first - begin >= seq_len - stride  # enough context
        scored += range(first, end)
    if stride is None or stride == seq_len:
        assert scored == [t for t in range(1, n) if t % seq_len]
    else:
        assert scored == list(range(1, n))


def test_ppl_matches_direct_nll(tiny_tokenizer):
    model = make_tiny("llama-gqa")
    res = perplexity(model, tiny_tokenizer, SAMPLE, seq_len=32, progress=False)
    ids = torch.tensor(tiny_tokenizer(SAMPLE, add_special_tokens=False).input_ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids) - 1, 32):
            x = ids[b: b + 32]
            logp = model(x[None]).logits[0, :-1].log_softmax(-1)
            total -= logp.gather(1, x[1:, None]).sum().item()
            count += len(x) - 1
    assert res.tokens == count and res.windows == math.ceil((len(ids) - 1) / 32)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_max_windows_and_stride(tiny_tokenizer):
    model = make_tiny("llama-gqa")
    few = perplexity(model, tiny_tokenizer, SAMPLE, seq_len=16, max_windows=2, progress=False)
    assert few.windows == 2 and few.tokens == 30
    slid = perplexity(model, tiny_tokenizer, SAMPLE, seq_len=16, stride=8, progress=False)
    n = len(tiny_tokenizer(SAMPLE, add_special_tokens=False).input_ids)
    assert slid.tokens == n - 1 and math.isfinite(slid.ppl)


@pytest.mark.parametrize("kw, match", [(dict(seq_len=1), "seq-len"), (dict(stride=0), "stride"),
                                       (dict(stride=64), "stride")])
def test_bad_protocol_arguments(tiny_tokenizer, kw, match):
    with pytest.raises(LatentKVError, match=match):
        perplexity(make_tiny("llama-gqa"), tiny_tokenizer, SAMPLE, **{"seq_len": 32, **kw}, progress=False)
