"""Sequential (GPTQ-style) conversion: calibration windows flow through the source and the converted
prefix side by side; layer l is factorized on the statistics of *its converted inputs*, and its
up-projections are refit to reproduce the *source's* outputs, so later layers absorb earlier
layers' error. (One-shot conversion instead gives every layer the source's own statistics.)
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..families import SourceLayout
from .configs import LowRankConfig
from .prefix import CONVERTED, SOURCE, PrefixWalk
from .rope import sample_windows
from .statistics import InputStats, Moments
from .surgery import convert_layer, per_layer


@torch.no_grad()
def convert_sequential(model, layout: SourceLayout, config: LowRankConfig, dims, batches: torch.Tensor,
                       progress: bool):
    """A converted copy of `model`; batches (N, T) are the fit windows."""
    new = copy.deepcopy(model)
    walk = PrefixWalk.embedded(model, batches, streams=2)
    dims = per_layer(dims, layout.num_layers)
    for i in tqdm(range(layout.num_layers), desc="convert (sequential)", disable=not progress):
        src_layer = model.model.layers[i]
        sigma = Moments.empty(layout.hidden_size, sample_windows(config.rope))
        cross = Moments.empty(layout.hidden_size)
        for (x_src,), (x_new,) in zip(walk.inputs(src_layer, SOURCE), walk.inputs(new.model.layers[i], CONVERTED)):
            sigma.add(x_new)
            cross.add(x_src, x_new)
        convert_layer(model, new, i, layout, config, dims[i], InputStats(sigma.second(), cross.second(), sample=sigma.sample()))
        mask = walk.mask(i)
        walk.advance(SOURCE, src_layer, mask)
        walk.advance(CONVERTED, new.model.layers[i], mask)
    return new
