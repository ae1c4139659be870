"""Tail averaging: the healed weights are the mean of the weights after each of the run's last optimizer steps
(Polyak-Ruppert suffix averaging). It is meant for runs that end at a high, constant rate, where small batches
leave the last iterates scattered around the optimum (not measured here); after a cosine decay to a tenth of
the rate, with the loss still falling, the mean trails the last step (measured worse on SmolLM2 at 50 %:
BENCHMARKS.md "deploy")."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def first_averaged_step(steps: int, fraction: float) -> int:
    """The 1-based optimizer step from which the mean runs: the last round(fraction * steps) steps (at least one
    when fraction > 0), or steps + 1 (no averaging) when fraction is 0."""
    if fraction <= 0:
        return steps + 1
    return steps - max(1, round(fraction * steps)) + 1


class TailAverage:
    """Running float32 mean of `params` over the steps from `first_step` on.

    params: the trainable tensors as the optimizer holds them (this process's shards under FSDP); the mean
    has their shapes and lives on their device."""

    def __init__(self, params: list[torch.Tensor], first_step: int):
        self.params, self.first_step = params, first_step
        self.mean: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after 1-based optimizer step `step`."""
        if step < self.first_step:
            return
        if not self.mean:
            self.mean = [p.detach().float().clone() for p in self.params]
        else:  # the running mean: m += (p - m) / n
            for m, p in zip(self.mean, self.params):
                m.lerp_(p.detach().float(), 1.0 / (self.count + 1))
        self.count += 1

    @torch.no_grad()
    def apply(self) -> int:
        """Write the mean into the parameters -> the number of steps it holds (0: the parameters are untouched)."""
        for m, p in zip(self.mean, self.params):
            p.copy_(m)
        return self.count

    def save(self, folder: Path, rank: int) -> None:
        """Into a checkpoint folder, one safetensors file per process (each holds its own shards)."""
        if self.count:
            tensors = {f"mean.{i}": m.contiguous() for i, m in enumerate(self.mean)}
            save_file({**tensors, "count": torch.tensor(self.count)}, str(folder / f"average-{rank}.safetensors"))

    def load(self, folder: Path, rank: int) -> None:
        path = folder / f"average-{rank}.safetensors"
        if not path.is_file():  # saved before the averaged steps began
            return
        state = load_file(str(path), device=str(self.params[0].device) if self.params else "cpu")
        self.count = int(state.pop("count"))
        self.mean = [state[f"mean.{i}"] for i in range(len(self.params))]
