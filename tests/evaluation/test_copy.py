"""The copy probe: exact for a model that copies perfectly, chance for one that cannot, deterministic."""

import math
from types import SimpleNamespace

import pytest
import torch

from latentkv.errors import LatentKVError
from latentkv.evaluation.copy import copy_probe, probe_ids

from conftest import make_tiny

VOCAB = 50_000


class Oracle(torch.nn.Module):
    """Predicts, at every position, the token one period back: a perfect induction circuit."""

    def __init__(self, grid, confident: bool = True):
        super().__init__()
        self.period = {2 * n + d: n + d for n, d in grid}  # sequence length -> distance between the copies
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096)
        self.confident = confident
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False, logits_to_keep=0):
        b, t = ids.shape
        logits = torch.zeros(b, t, VOCAB)
        if self.confident:
            p = self.period[t]
            nxt = torch.arange(t) + 1 - p  # where the token after t stood one copy earlier
            ok = nxt >= 0
            for i in range(b):
                logits[i, ok.nonzero()[:, 0], ids[i, nxt[ok]]] = 30.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


GRID = [(16, 0), (16, 8), (40, 0), (40, 8)]


def test_a_perfect_copier_scores_everything():
    r = copy_probe(Oracle(GRID), lengths=(16, 40), distances=(0, 8), progress=False)
    assert r["accuracy"] == 1.0 and r["nll"] < 1e-6
    assert [(x["length"], x["distance"]) for x in r["rows"]] == GRID and all(x["accuracy"] == 1.0 for x in r["rows"])


def test_a_model_that_cannot_copy_scores_chance():
    r = copy_probe(Oracle(GRID, confident=False), lengths=(16, 40), distances=(0, 8), progress=False)
    assert r["nll"] == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_deterministic_under_a_seed_and_different_across_seeds():
    a, b = probe_ids(32, 8, 4, VOCAB, seed=0), probe_ids(32, 8, 4, VOCAB, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, probe_ids(32, 8, 4, VOCAB, seed=1))
    assert torch.equal(a[:, :32], a[:, -32:]) and a.shape == (4, 72) and int(a.min()) >= 1000
    model = make_tiny("llama-gqa")
    r1 = copy_probe(model, lengths=(8,), distances=(0, 4), progress=False)
    r2 = copy_probe(model, lengths=(8,), distances=(0, 4), progress=False)
    assert r1["rows"] == r2["rows"] and 0.0 <= r1["accuracy"] <= 1.0


def test_small_vocabularies_and_bad_input():
    ids = probe_ids(8, 0, 2, vocab=320, seed=0)  # tiny test vocabularies still give valid ids
    assert int(ids.max()) < 320
    with pytest.raises(LatentKVError, match="exceed the model's 512 positions"):
        copy_probe(make_tiny("llama-gqa"), lengths=(300,), distances=(0,), progress=False)
    with pytest.raises(LatentKVError, match="lengths must be >= 2"):
        copy_probe(make_tiny("llama-gqa"), lengths=(1,), progress=False)
