"""Local (layer-wise) healing: each converted attention layer learns to reproduce its source layer.

Calibration windows flow through the source and the healed prefix side by side (as in sequential
conversion). At layer l the MLA layer sees the inputs the *healed* prefix gives it and is fitted
to the *source* layer's attention output on the source's inputs, so it also absorbs the error
the earlier layers left. Loss: relative squared error ||attn(x_new) - y_src||^2 / ||y_src||^2,
a few hundred Adam steps on random mini-batches of windows, then one pass moves both streams on.
A layer keeps its new weights only if the full-batch error went down.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..conversion.prefix import CHUNK, PrefixWalk, chunked, input_norm
from ..errors import LatentKVError
from ..runtime.install import is_mla

TEACHER, STUDENT = 0, 1  # the walk's streams


@torch.no_grad()
def local_heal(student, teacher, ids: torch.Tensor, steps: int = 200, lr: float = 1e-3, batch: int = 4,
               seed: int = 0, progress: bool = True) -> dict:
    """Fit every MLA layer of `student` (in place) to `teacher`'s attention outputs.

    ids: (N, T) calibration windows. -> {"layers": [{"before", "after", "kept"}...], "seconds"}.
    """
    if not is_mla(student):
        raise LatentKVError("local healing needs a model converted by latentkv (every layer MLA)")
    t0, ref = time.perf_counter(), next(student.parameters())
    ids = ids.to(ref.device)
    walk = PrefixWalk(student, [teacher.model.embed_tokens(ids).to(ref.dtype), student.model.embed_tokens(ids)])
    gen = torch.Generator().manual_seed(seed)
    report = []
    for i in tqdm(range(len(student.model.layers)), desc="local heal", disable=not progress):
        src, new = teacher.model.layers[i], student.model.layers[i]
        mask = walk.mask(i)
        rope = walk.ropes[i]
        y = chunked(lambda h: src.self_attn(input_norm(src)(h), position_embeddings=rope,
                                            attention_mask=mask)[0], walk.h[TEACHER])
        x = chunked(input_norm(new), walk.h[STUDENT])
        report.append(fit_attention(new.self_attn, x, y, rope, mask, steps, lr, batch, gen))
        walk.advance(TEACHER, src, mask)
        walk.advance(STUDENT, new, mask)
    return {"layers": report, "steps_per_layer": steps, "windows": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "seconds": round(time.perf_counter() - t0, 2)}


def relative_error(attn, x: torch.Tensor, y: torch.Tensor, rope, mask) -> float:
    """Full-batch ||attn(x) - y||^2 / ||y||^2 for x, y (N, T, D)."""
    num = den = 0.0
    for c in range(0, x.shape[0], CHUNK):
        out = attn(x[c: c + CHUNK], position_embeddings=rope, attention_mask=mask)[0]
        num += float((out - y[c: c + CHUNK]).pow(2).sum())
        den += float(y[c: c + CHUNK].pow(2).sum())
    return num / max(den, 1e-30)


def fit_attention(attn, x, y, rope, mask, steps: int, lr: float, batch: int, gen) -> dict:
    """Adam with cosine decay on the layer's own parameters; keeps the result only if it helped."""
    before = relative_error(attn, x, y, rope, mask)
    saved = {k: v.clone() for k, v in attn.state_dict().items()}
    params = [p for p in attn.parameters() if p.dtype.is_floating_point]
    flags = [p.requires_grad for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
            pick = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
            out = attn(x[pick], position_embeddings=rope, attention_mask=mask)[0]
            target = y[pick]
            loss = (out - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    after = relative_error(attn, x, y, rope, mask)
    kept = after < before
    if not kept:
        attn.load_state_dict(saved)
    return {"before": round(before, 6), "after": round(min(after, before), 6), "kept": kept}
