"""Passkey prompts: sized to the context, needle at the asked depth, the answer is the key."""

import pytest

from latentkv.evaluation.passkey import NEEDLE, QUESTION, build_prompt


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
