"""Calibration statistics: per-layer second moment of the attention input, from hooks.

Everything the factorizers need is a linear function of the attention input x (after the
layer's input norm): queries q = W_q x, keys, values. So one `(D+1, D+1)` fp64 matrix per layer,
`E[[x; 1][x; 1]^T]` (the 1 carries biases), is enough, and memory does not grow with samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..families import attention_layers
from .linalg import psd_factor


@dataclass
class Moments:
    """Running `sum [x;1][y;1]^T` over tokens (y = x unless given); `second()` is the mean. With `keep`
    > 0 the first `keep` whole windows of x are kept too (`sample()`): scores that need real
    activations (RoPElite's attention-output error) read them."""

    total: torch.Tensor  # (D+1, D+1) fp64
    tokens: int = 0
    keep: int = 0
    windows: list = field(default_factory=list)  # [(n, T, D) fp32 on CPU], at most `keep` rows in all

    @classmethod
    def empty(cls, dim: int, keep: int = 0) -> Moments:
        return cls(torch.zeros(dim + 1, dim + 1, dtype=torch.float64), keep=keep)

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """x, y (..., D): every row is a token (padding must already be dropped)."""
        room = self.keep - sum(w.shape[0] for w in self.windows)
        if room > 0 and x.dim() == 3:
            self.windows.append(x[:room].detach().float().cpu())
        ax = _augment(x)  # (N, D+1)
        # fp32 product per batch (fast BLAS), fp64 running sum (no drift over many batches)
        self.total += (ax.T @ (ax if y is None else _augment(y))).to(self.total.device, torch.float64)
        self.tokens += ax.shape[0]

    def second(self) -> torch.Tensor:
        if self.tokens == 0:
            raise LatentKVError("calibration saw no tokens; pass a longer --calib text")
        return self.total / self.tokens

    def sample(self) -> torch.Tensor | None:
        """(n, T, D) the kept windows, or None when none were kept."""
        return torch.cat(self.windows) if self.windows else None


def _augment(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).float()
    return torch.cat((x, x.new_ones(x.shape[0], 1)), 1)


@dataclass
class InputStats:
    """What one layer's conversion may use: sigma = E[x x^T] of its (augmented) attention input,
    cross = E[x_src x^T] when x comes from an already-converted prefix (sequential mode), and
    attn_sigma = E[xbar xbar^T] of the attention-weighted input averages xbar_t = sum_s p_ts x_s
    (pooled over heads): what a value error is actually multiplied by on its way to the output."""

    sigma: torch.Tensor
    cross: torch.Tensor | None = None
    attn_sigma: torch.Tensor | None = None
    sample: torch.Tensor | None = None  # (n, T, D) whole windows of the input, when asked for (Moments.keep)
    # what a strategy derives from `sample` once per layer and reuses across the split search's candidates
    memo: dict = field(default_factory=dict)

    def blended(self, weight: float) -> InputStats:
        """Stats whose sigma is (1 - weight) sigma + weight attn_sigma (self when there is none)."""
        if weight == 0 or self.attn_sigma is None:
            return self
        return InputStats((1 - weight) * self.sigma + weight * self.attn_sigma, self.cross, sample=self.sample,
                          memo=self.memo)

    @cached_property
    def factor(self) -> torch.Tensor:
        """Lower-triangular R with R R^T = sigma (damped), computed once per layer however often used."""
        return psd_factor(self.sigma)

    def without_constant(self) -> InputStats:
        """The moments of x alone (the constant 1 that carries biases dropped): (D, D) each."""
        return InputStats(self.sigma[:-1, :-1], None if self.cross is None else self.cross[:-1, :-1],
                          sample=self.sample, memo=self.memo)


ATTN_STRIDE = 4  # every 4th query position feeds attn_sigma: the P @ X product is the costly part


@contextlib.contextmanager
def record_attention_inputs(attn_modules: list, moments: list[Moments], averaged: list[Moments] | None = None):
    """Accumulate each attention module's `hidden_states` into `moments[i]` while inside, and, with
    `averaged`, the attention-weighted averages of them (needs a kernel that returns weights: eager)."""
    inputs = {}

    def pre(i):
        def fn(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            moments[i].add(x.detach())
            inputs[i] = x.detach()
        return fn

    def post(i):
        def fn(module, args, kwargs, out):
            probs = out[1] if isinstance(out, tuple) and len(out) > 1 else None  # (B, H, T, T)
            if probs is None:
                raise LatentKVError("attention-averaged statistics need attention weights: run with eager attention")
            # rows of p sum to 1, so the averaged [x; 1] is [xbar; 1] and Moments can augment xbar
            averaged[i].add(probs[:, :, ::ATTN_STRIDE].float() @ inputs.pop(i).float()[:, None])
        return fn

    handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(attn_modules)]
    if averaged is not None:
        handles += [m.register_forward_hook(post(i), with_kwargs=True) for i, m in enumerate(attn_modules)]
    try:
        yield moments
    finally:
        for h in handles:
            h.remove()


def calibration_batches(tokenizer, text: str, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` evenly spaced windows of `seq_len` tokens from `text` -> (samples, seq_len)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise LatentKVError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seq-len {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, samples).long()
    return torch.stack([ids[s: s + seq_len] for s in starts])


@contextlib.contextmanager
def eager_attention(model, on: bool = True):
    """While inside, `model` attends with the eager kernel (`on`), the only one whose attention modules
    return their probabilities; its own kernel comes back on the way out."""
    kernel = model.config._attn_implementation
    if on:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if on:
            model.set_attn_implementation(kernel)


@torch.no_grad()
def collect_stats(model, batches: torch.Tensor, progress: bool = True, attention: bool = False,
                  keep: int = 0) -> list[InputStats]:
    """One-shot statistics of the (source) model: run the calibration windows, hook every layer.
    With `attention`, also attn_sigma (the model runs with eager attention meanwhile); with `keep`, each
    layer's input on the first `keep` windows as `sample`."""
    attns = attention_layers(model)
    hidden = model.config.hidden_size
    moments = [Moments.empty(hidden, keep) for _ in attns]
    averaged = [Moments.empty(hidden) for _ in attns] if attention else None
    with eager_attention(model, attention), record_attention_inputs(attns, moments, averaged):
        for row in tqdm(batches, desc="calibrate", disable=not progress):
            model.model(row[None], use_cache=False)  # the base model: the lm_head is not needed here
    return [InputStats(m.second(), attn_sigma=a.second() if averaged else None, sample=m.sample())
            for m, a in zip(moments, averaged or moments)]
