"""Generation as a ladder of small steps: `prefill`, `decode_one_token`, `decode_n_tokens`; `generate`
(text in, text out) and `reports.bench` (timed rows) both climb it.

Converted models decode over a `LatentCache` preallocated to the final length (no step copies the
cache), single-token steps take the absorbed path and prefill whichever path `MLAAttention`
finds cheaper; source models use transformers' `DynamicCache`, so both compare alike.
Batches are left-padded; each sequence has its own positions and stops on EOS or a stop string.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from ..errors import LatentKVError
from ..record import record_of
from .cache import LatentCache
from .install import mla_layers
from .quant import CacheFormat, as_format


@dataclass
class Generation:
    """texts/tokens: the new text and token ids per prompt; finish: "eos" | "stop" | "length"."""

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[int]
    finish: list[str]
    prefill_s: float
    decode_s: float
    decode_steps: int
    cache_bytes: int
    timings: list[float] = field(default_factory=list)  # seconds per decode step

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.texts) * self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("timings")
        return {**out, "decode_tokens_per_s": self.decode_tokens_per_s}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids (B, T), attention_mask (B, T), padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def new_cache(model, capacity: int, cache_dtype: str | CacheFormat = "model"):
    """A LatentCache of exactly `capacity` tokens for converted models (latents stored as `cache_dtype`),
    a DynamicCache otherwise."""
    if record_of(model) is not None:
        return LatentCache(model, capacity=capacity, cache_dtype=cache_dtype)
    if as_format(cache_dtype).quantized:
        raise LatentKVError("--cache-dtype quantizes a latentkv latent cache and this is a source model; convert it "
                            "first (for its own K/V, transformers' QuantizedCache is the tool)")

    return DynamicCache(config=model.config)


def pick(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # the seeded generator lives on the CPU, so the draw does too (B x V, small) and the tokens go back
    return torch.multinomial(probs.cpu(), 1, generator=rng)[:, 0].to(logits.device)


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


def check_lengths(model, rows: list[list[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise LatentKVError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if any(len(r) == 0 for r in rows):
        raise LatentKVError("a prompt is empty after tokenization; give at least one token of text")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(r) for r in rows)
    if limit and longest + max_new_tokens > limit:
        raise LatentKVError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                            f"{limit}; shorten the prompt or lower --max-new-tokens")


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """ids (B, T) into `cache`, `chunk` tokens per forward (all at once by default; chunks bound the
    (chunk x context) attention scores) -> the last token's logits (B, V)."""
    b, t = ids.shape
    pos = position_ids if position_ids is not None else torch.arange(t, device=ids.device)[None].expand(b, -1)
    step = chunk or t
    for c in range(0, t, step):
        mask = {} if attention_mask is None else {"attention_mask": attention_mask[:, : c + step]}
        logits = model(input_ids=ids[:, c: c + step], position_ids=pos[:, c: c + step], cache=cache, use_cache=True,
                       logits_to_keep=1, **mask).logits[:, -1]
    sync(logits)
    return logits


def sync(t: torch.Tensor) -> None:
    """Wait for a GPU's queued work on t's device, so a wall-clock time covers it (no-op on the CPU)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@torch.no_grad()
def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor, cache, *,
                     attention_mask: torch.Tensor | None = None, mla_path: str | None = None) -> torch.Tensor:
    """tokens (B,) at positions (B, 1) -> next-token logits (B, V). `mla_path` forces an MLA path for
    this step only (source models take none)."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    if mla_path is not None:
        kw["mla_path"] = mla_path
    return model(input_ids=tokens[:, None], position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1,
                 **kw).logits[:, -1]


def compiled_decoder(model, mode: str | None = None) -> Callable:
    """`decode_one_token` through torch.compile (inductor), same signature and results (up to the
    order of sums). A converted model's decode folds are computed eagerly first, so the trace sees
    plain tensors and each step is one graph. Expect two compilations before the steps run compiled:
    one for the first cache length, one dynamic in it; time steps after a warm-up."""
    with torch.no_grad():
        for m in mla_layers(model):
            m.decode_folds()
    return torch.compile(decode_one_token, mode=mode)


@torch.no_grad()
def decode_n_tokens(model, cache, logits: torch.Tensor | None, positions: torch.Tensor, steps: int,
                    choose: Callable[[torch.Tensor | None], torch.Tensor], *, attention_mask=None,
                    on_token: Callable[[int, torch.Tensor], bool] | None = None, mla_path: str | None = None,
                    step_fn: Callable = decode_one_token):
    """Up to `steps` times: choose the next tokens (B,) from `logits` (B, V), hand them to `on_token`
    (True stops before the forward), then decode them at the next positions with `step_fn`
    (`decode_one_token` or a `compiled_decoder`). positions (B, P): the last column is where the
    previous token sat. -> seconds of each decode forward."""
    times = []
    for step in range(steps):
        tokens = choose(logits)
        if on_token is not None and on_token(step, tokens):
            break
        t = time.perf_counter()
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(len(tokens), 1)), 1)
        positions = positions[:, -1:] + 1
        logits = step_fn(model, tokens, positions, cache, attention_mask=attention_mask, mla_path=mla_path)
        sync(logits)
        times.append(time.perf_counter() - t)
    return times


@torch.no_grad()
def generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_p: float = 1.0, stop: tuple[str, ...] = (), use_eos: bool = True, seed: int = 0,
             stream: Callable[[int, str], None] | None = None, cache_dtype: str | CacheFormat = "model") -> Generation:
    """Generate up to `max_new_tokens` per prompt. Greedy at temperature 0 (the same tokens as
    transformers' `generate`), nucleus sampling otherwise (seeded). `stream(i, text)` receives
    each prompt's new text as it becomes final."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not temperature >= 0:
        raise LatentKVError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise LatentKVError(f"--top-p must lie in (0, 1], got {top_p}")
    if not prompts:
        raise LatentKVError("no prompts given; pass a prompt or a --batch-file with one prompt per line")
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    check_lengths(model, rows, max_new_tokens)
    eos = eos_ids(model, tokenizer) if use_eos else set()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    ids, mask = left_pad(rows, pad)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = Generation([""] * len(rows), [[] for _ in rows], [len(r) for r in rows], [""] * len(rows), 0.0, 0.0, 0, 0)
    rng = torch.Generator().manual_seed(seed) if temperature > 0 else None
    cache = new_cache(model, ids.shape[1] + max_new_tokens, cache_dtype)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    start = time.perf_counter()
    logits = prefill(model, ids, cache, attention_mask=mask, position_ids=pos)
    out.prefill_s = time.perf_counter() - start
    streamed = [0] * len(rows)

    def on_token(step: int, nxt: torch.Tensor) -> bool:
        _advance(out, tokenizer, nxt, eos, stop, step == max_new_tokens - 1)
        _stream(out, stream, streamed, stop)
        return all(out.finish)

    out.timings = decode_n_tokens(model, cache, logits, pos, max_new_tokens, lambda lg: pick(lg, temperature, top_p, rng),
                                  attention_mask=mask, on_token=on_token)
    out.decode_s, out.decode_steps = sum(out.timings), len(out.timings)
    out.cache_bytes = cache_tensor_bytes(cache)
    return out


def _advance(out: Generation, tokenizer, nxt: torch.Tensor, eos: set[int], stop, last: bool) -> None:
    """Append each unfinished sequence's token; mark it finished on EOS, a stop string, or length."""
    for i, tok in enumerate(nxt.tolist()):
        if out.finish[i]:
            continue
        if tok in eos:
            out.finish[i] = "eos"
            continue
        out.tokens[i].append(tok)
        text = tokenizer.decode(out.tokens[i], skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        out.texts[i] = text if cut < 0 else text[:cut]
        out.finish[i] = "stop" if cut >= 0 else ("length" if last else "")


def _stream(out: Generation, stream, streamed: list[int], stop) -> None:
    """Send each sequence's text that can no longer change (a stop string may still be forming)."""
    if stream is None:
        return
    hold = max((len(s) for s in stop), default=1) - 1
    for i, text in enumerate(out.texts):
        ready = len(text) if out.finish[i] else max(streamed[i], len(text) - hold)
        if ready > streamed[i]:
            stream(i, text[streamed[i]:ready])
            streamed[i] = ready


def cache_tensor_bytes(cache) -> int:
    """Bytes held by a cache's tensors: a LatentCache reports its own, a transformers cache is summed
    over its layers' key/value tensors."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None and t.numel())


@torch.no_grad()
def greedy_continuation(model, ids: list[int], steps: int) -> list[int]:
    """Prompt ids -> the next `steps` greedy token ids, decoded through the model's cache as `generate`
    decodes (no EOS or stop strings: the caller reads what it needs)."""
    device = next(model.parameters()).device
    cache = new_cache(model, len(ids) + steps)
    logits = prefill(model, torch.tensor([ids], device=device), cache)
    out: list[int] = []

    def on_token(step: int, nxt: torch.Tensor) -> bool:
        out.append(int(nxt[0]))
        return step == steps - 1  # the last token needs no forward

    decode_n_tokens(model, cache, logits, torch.tensor([[len(ids) - 1]], device=device), steps,
                    lambda lg: lg.argmax(-1), on_token=on_token)
    return out
