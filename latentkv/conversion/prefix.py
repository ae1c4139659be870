"""The prefix walk: calibration windows flowing through decoder layers one at a time.

Sequential conversion, the latent-norm fit, local healing and streaming all need, at layer i,
the hidden states that the layers before it (source, converted, or both side by side) produce on
the calibration windows, and then need to move those states on through layer i. `PrefixWalk`
holds what every layer shares (positions, RoPE, one mask per window size) and the streams
`h[k]` (N, T, D); `advance` runs windows through one layer, CHUNK at a time.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..families import layer_rope_types, sliding_window

CHUNK = 4  # windows per forward: bounds the (CHUNK, H, T, T) attention memory
SOURCE, CONVERTED = 0, 1  # a two-stream walk's streams: h_src, h_new


def causal_mask(t: int, window: int | None) -> torch.Tensor:
    """(1, 1, t, t) bool, True = may attend; with a sliding window as the source layer has."""
    i = torch.arange(t)
    allowed = i[:, None] >= i[None, :]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    return allowed[None, None]


def advance(layer, h: torch.Tensor, rope, pos, mask, device=None) -> torch.Tensor:
    """h (N, T, D) through one decoder layer, CHUNK windows at a time; with `device`, each chunk
    visits it (layer, rope, pos and mask must already be there) and the result stays where h is."""
    out = []
    for c in range(0, h.shape[0], CHUNK):
        o = layer(h[c: c + CHUNK].to(device or h.device), attention_mask=mask, position_ids=pos,
                  position_embeddings=rope)
        out.append((o[0] if isinstance(o, tuple) else o).to(h.device))
    return torch.cat(out)


def input_norm(layer) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a decoder layer applies to the stream before attention: its input norm, or nothing for OLMo-2,
    whose norms follow attention and the MLP."""
    return getattr(layer, "input_layernorm", None) or (lambda h: h)


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """fn over h (N, ...) CHUNK windows at a time, concatenated."""
    return torch.cat([fn(h[c: c + CHUNK]) for c in range(0, h.shape[0], CHUNK)])


class PrefixWalk:
    """Streams of windows `h[k]` (N, T, D) entering the current layer, one per decoder stack.

    `model` gives the rotary embedding and each layer's window (`mask(i)`); `device` is where the
    layers run (streams stay where they are); `additive` masks (0 / finfo.min, for eager kernels
    that add the mask) instead of bool ones.
    """

    def __init__(self, model, streams: list[torch.Tensor | None], device=None, additive: bool = False):
        self.model, self.h, self.device, self.additive = model, list(streams), device, additive
        first = next(h for h in self.h if h is not None)  # (N, T, D)
        t, dev = first.shape[1], device or first.device
        self.pos = torch.arange(t, device=dev)[None]
        # the rotary embedding reads only its input's dtype and device; Gemma-3 has one per layer type
        rotary, x = model.model.rotary_emb.to(dev), torch.zeros(1, t, 1, device=dev, dtype=first.dtype)
        types = layer_rope_types(model.config)
        by_type = {k: rotary(x, self.pos) if k is None else rotary(x, self.pos, k) for k in set(types)}
        self.ropes = [by_type[k] for k in types]  # per layer: (cos, sin), each (1, T, d)
        self.seq_len = t

    @classmethod
    def embedded(cls, model, ids: torch.Tensor, streams: int = 1, **kw) -> PrefixWalk:
        """A walk whose `streams` streams all start as `model`'s embeddings of ids (N, T)."""
        h = model.model.embed_tokens(ids)  # (N, T, D)
        return cls(model, [h] + [h.clone() for _ in range(streams - 1)], **kw)

    def mask(self, i: int) -> torch.Tensor:
        """(1, 1, T, T): layer i's causal (and sliding-window) mask, on the walk's device."""
        attn = self.model.model.layers[i].self_attn
        allowed = causal_mask(self.seq_len, sliding_window(self.model.config, attn, i)).to(self.pos.device)
        if not self.additive:
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def advance(self, k: int, layer, mask: torch.Tensor) -> None:
        """Move stream k on through `layer` (the layer as it is now: converted in the loop body, say)."""
        self.h[k] = advance(layer, self.h[k], self.ropes[layer.self_attn.layer_idx], self.pos, mask, self.device)

    def inputs(self, layer, *ks: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """`layer`'s attention inputs (its input norm applied) of streams ks, CHUNK windows at a time."""
        norm = input_norm(layer)
        for c in range(0, self.h[ks[0]].shape[0], CHUNK):
            yield tuple(norm(self.h[k][c: c + CHUNK]) for k in ks)
