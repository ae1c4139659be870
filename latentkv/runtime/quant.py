"""Latent cache formats: what one cached token's latent (and optionally its rope key) is stored as.

Every format packs a token's values into bytes, (..., n) -> (..., nbytes) uint8, so the cache layers
that grow, crop and trim along the token axis need not know the format:

- `model`: the model's own dtype (no quantization; the cache does not go through here);
- `fp8_e4m3`: float8 e4m3 with one fixed scale for the whole tensor (default 1.0, values clamped to
  +-448), which is what vLLM's `--kv-cache-dtype fp8` does for MLA: its latent and rope key share one
  per-tensor scale, 1.0 unless calibrated; the fitted latent norm keeps the latent near rms 1;
- `int8` / `int4`: symmetric integers with one fp16 scale per token (or per `group` values):
  scale = absmax / 127 (int8) or / 7 (int4, two values per byte, stored offset by 8);
- `int4_asym`: 16 levels over each group's [min, max], with an fp16 scale and an fp16 zero point (the min)
  per group: one more level than `int4` and no range spent on the side a group does not reach, for 2 more
  bytes per group (what quanto and HQQ do for K/V).

Scales are stored as fp16 and the codes are computed against the rounded scale, so dequantize is
exactly what a reader of the bytes would compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LatentKVError

CACHE_DTYPES = ("model", "fp8_e4m3", "int8", "int4", "int4_asym")
LEVELS = {"int8": 127, "int4": 7, "int4_asym": 15}  # the largest code
NIBBLES = ("int4", "int4_asym")  # two codes per byte
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class CacheFormat:
    """How a cache stores latents. `group`: values per scale (None: one scale per token); `rope`: the
    rope key is stored in this format too (else in the model's dtype); `fp8_scale`: fp8's per-tensor scale."""

    name: str = "model"
    group: int | None = None
    rope: bool = False
    fp8_scale: float = 1.0

    def __post_init__(self):
        if self.name not in CACHE_DTYPES:
            raise LatentKVError(f"unknown --cache-dtype {self.name!r}; choose one of: {', '.join(CACHE_DTYPES)}")
        if self.group is not None and (self.group < 1 or self.name not in LEVELS):
            raise LatentKVError(f"--cache-group {self.group} needs an int cache dtype and a group of at least 1")
        if self.name == "fp8_e4m3" and not self.fp8_scale > 0:
            raise LatentKVError(f"the fp8 cache scale must be positive, got {self.fp8_scale}")

    @property
    def quantized(self) -> bool:
        return self.name != "model"

    @property
    def asymmetric(self) -> bool:
        return self.name == "int4_asym"

    @property
    def group_params(self) -> int:
        """fp16 values stored per group: its scale, and for the asymmetric format its zero point."""
        return 2 if self.asymmetric else 1

    def scales(self, n: int) -> int:
        """Scales stored for n values of one token."""
        if self.name not in LEVELS:
            return 0
        return 1 if self.group is None else math.ceil(n / self.group)

    def nbytes(self, n: int) -> int:
        """Bytes one token's n values take in this format, scales included."""
        codes = (n + 1) // 2 if self.name in NIBBLES else n
        return codes + self.scales(n) * self.group_params * SCALE_DTYPE.itemsize

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) float -> (..., nbytes(n)) uint8."""
        if self.name == "fp8_e4m3":
            y = (x.float() / self.fp8_scale).clamp(-FP8_MAX, FP8_MAX)
            return y.to(torch.float8_e4m3fn).view(torch.uint8)
        n, lead = x.shape[-1], x.shape[:-1]
        g = n if self.group is None else self.group
        groups = self.scales(n)
        y = x.float()
        y = torch.cat((y, y[..., -1:].expand(*lead, groups * g - n)), -1).view(*lead, groups, g)  # pad: no new range
        if self.asymmetric:
            low = y.amin(-1).to(SCALE_DTYPE)  # (..., groups)
            scale = ((y.amax(-1) - low.float()) / LEVELS[self.name]).clamp(min=1e-7).to(SCALE_DTYPE)
            q = torch.round((y - low.float()[..., None]) / scale.float()[..., None]).clamp(0, LEVELS[self.name])
            params = torch.stack((scale, low), -1).reshape(*lead, 2 * groups)
        else:
            scale = (y.abs().amax(-1) / LEVELS[self.name]).clamp(min=1e-7).to(SCALE_DTYPE)  # (..., groups)
            q = torch.round(y / scale.float()[..., None]).clamp(-LEVELS[self.name], LEVELS[self.name])
            q, params = q + (8 if self.name == "int4" else 0), scale
        q = q.reshape(*lead, -1)[..., :n]
        if self.name in NIBBLES:
            q = torch.nn.functional.pad(q.to(torch.uint8), (0, n % 2))  # int4: nibbles 1..15 (pad: 0)
            codes = q[..., 0::2] | (q[..., 1::2] << 4)
        else:
            codes = q.to(torch.int8).view(torch.uint8)
        return torch.cat((codes, params.contiguous().view(torch.uint8)), -1)

    def dequantize(self, b: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(..., nbytes(n)) uint8 -> (..., n) in dtype."""
        if self.name == "fp8_e4m3":
            return (b.view(torch.float8_e4m3fn).float() * self.fp8_scale).to(dtype)
        groups, lead = self.scales(n), b.shape[:-1]
        code_bytes = b.shape[-1] - groups * self.group_params * SCALE_DTYPE.itemsize
        params = b[..., code_bytes:].clone(memory_format=torch.contiguous_format).view(SCALE_DTYPE).float()
        params = params.view(*lead, groups, self.group_params)  # (..., groups, [scale, low])
        codes = b[..., :code_bytes]
        if self.name in NIBBLES:
            q = torch.stack((codes & 15, codes >> 4), -1).reshape(*lead, -1)[..., :n].float()
            q = q if self.asymmetric else q - 8
        else:
            q = codes.clone(memory_format=torch.contiguous_format).view(torch.int8).float()
        g = n if self.group is None else self.group
        spread = lambda t: t.repeat_interleave(g, -1)[..., :n]  # noqa: E731  (..., groups) -> (..., n)
        y = q * spread(params[..., 0])
        return (y + spread(params[..., 1]) if self.asymmetric else y).to(dtype)


def as_format(cache_dtype: str | CacheFormat) -> CacheFormat:
    """A `--cache-dtype` name or a CacheFormat -> the CacheFormat."""
    return cache_dtype if isinstance(cache_dtype, CacheFormat) else CacheFormat(cache_dtype)
