"""Passkey prompts: sized to the context, needle at the asked depth, the answer is the key."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from latentkv.evaluation.passkey import ANSWER_ROOM, NEEDLE, QUESTION, build_prompt, first_number, passkey


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_needle_position(tiny_tokenizer, depth):
    prompt, answer = build_prompt(tiny_tokenizer, 400, depth, "12345")
    assert abs(len(prompt) - 400) <= 1
    text = tiny_tokenizer.decode(prompt)
    needle = NEEDLE.format(key="12345")
    assert text.endswith(QUESTION)
    haystack = len(text) - len(needle) - len(QUESTION)
    assert abs(text.index(needle) / haystack - depth) < 0.05
    assert tiny_tokenizer.decode(answer).strip() == "12345"


def test_first_number_reads_the_first_run_of_digits():
    assert first_number(" the 60494. 12") == "60494"
    assert first_number("6049 4") == "6049"
    assert first_number(" the pass key") is None


class Oracle(nn.Module):
    """Predicts, at every position, the next input token (so the teacher-forced key is always right),
    and `after` at the last position: what greedy decoding would say once the key is out."""

    def __init__(self, vocab: int, after: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.vocab, self.after = vocab, after

    def forward(self, ids, use_cache=False):
        nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], self.after)], 1)
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, self.vocab).float())


def _token(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the tiny tokenizer"
    return ids[0]


@pytest.mark.parametrize("after, found", [(".", 1.0), ("7", 0.0)])
def test_strict_hits_are_found_unless_the_number_runs_on(tiny_tokenizer, after, found):
    """A strict hit is found from the same forward: its key ends the number unless the next token is a digit."""
    model = Oracle(len(tiny_tokenizer), _token(tiny_tokenizer, after))
    never = lambda ids, n: pytest.fail("a strict hit must not decode again")  # noqa: E731
    res = passkey(model, tiny_tokenizer, contexts=(300,), depths=(0.0, 1.0), trials=2, progress=False,
                  continuation=never)
    assert res["accuracy"] == 1.0 and res["found_accuracy"] == found
    assert all(r["found"] == found * r["trials"] for r in res["rows"])


def test_strict_misses_are_scored_on_the_decoded_answer(tiny_tokenizer):
    """A model that misses the strict score is asked for its greedy answer; a key after other words counts."""
    model = Oracle(len(tiny_tokenizer), 0)
    model.forward = lambda ids, use_cache=False: SimpleNamespace(logits=torch.zeros(1, ids.shape[1], model.vocab))
    asked = []

    def says(key_first: bool):
        def cont(ids, n):
            asked.append(n)
            key = tiny_tokenizer.decode(ids).split("The pass key is ")[1][:5]
            text = f" the {key}." if key_first else " the 1 and then more"
            return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        return cont

    hit = passkey(model, tiny_tokenizer, contexts=(300,), depths=(0.5,), trials=3, progress=False,
                  continuation=says(True))
    miss = passkey(model, tiny_tokenizer, contexts=(300,), depths=(0.5,), trials=3, progress=False,
                   continuation=says(False))
    assert hit["accuracy"] == miss["accuracy"] == 0.0
    assert hit["found_accuracy"] == 1.0 and miss["found_accuracy"] == 0.0
    assert len(asked) == 6 and all(n > ANSWER_ROOM for n in asked)
    assert "found" not in passkey(model, tiny_tokenizer, contexts=(300,), depths=(0.5,), trials=1,
                                  progress=False)["rows"][0]
