"""Read a DeepSeek-V3 checkpoint (ours or anyone's) into the latentkv runtime.

Stock transformers builds the model (MoE, norms, rotary); each `DeepseekV3Attention` is swapped
for our `MLAAttention` with the same weights, so absorbed decode, the latent cache, `generate`
and `bench` work on any MLA checkpoint. The inverse of export's row permutation (`layout.py`): engine rope
rows are interleaved pairs, ours half-split; the engine's softmax scale (yarn mscale included)
is kept as ours, and its rotary already holds the right frequencies (rope_freq_idx = 0..m-1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import LatentKVError, first_line
from ..record import make_record, record_of
from ..runtime.install import install_layer
from ..runtime.mla import MLADims
from .layout import interleave_order, reorder_rope_rows

ENGINE_TYPES = ("deepseek_v3",)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_engine_checkpoint(path: Path) -> bool:
    return _model_type(path) in ENGINE_TYPES


def require_engine_checkpoint(src: str | Path) -> None:
    """One-line error unless `src` is a DeepSeek-V3 checkpoint directory (what `latentkv load` reads)."""
    path = Path(src)
    if not path.is_dir():
        raise LatentKVError(f"checkpoint {src} not found; pass a DeepSeek-V3 checkpoint directory")
    kind = _model_type(path)
    if kind not in ENGINE_TYPES:
        raise LatentKVError(f"{src} is not a DeepSeek-V3 checkpoint (model_type {kind!r}); `latentkv load` reads "
                            "DeepSeek-V3 checkpoints; to convert a source model use `latentkv convert`")


def load_engine_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32):
    """-> (model with MLAAttention layers in eval mode, tokenizer or None). safetensors only, no remote code."""
    path = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LatentKVError(f"could not load DeepSeek-V3 checkpoint {path}: {first_line(e)}; it needs "
                            "config.json and *.safetensors weights") from None
    if getattr(model.config, "attention_bias", False):
        raise LatentKVError(f"{path} has attention biases (attention_bias: true); the latentkv runtime reads "
                            "bias-free DeepSeek-V3 attention only")
    dims = [swap_attention(model, i) for i in range(len(model.model.layers))]
    model.config.latentkv = _record(model, path, dims)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok


def swap_attention(model, i: int):
    """Replace layer i's DeepseekV3Attention by an equivalent MLAAttention; -> its MLADims."""
    attn, cfg = model.model.layers[i].self_attn, model.config
    p = cfg.qk_rope_head_dim
    dims = MLADims(hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads, kv_lora_rank=cfg.kv_lora_rank,
                   qk_rope_head_dim=p, qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, softmax_scale=float(attn.scaling),
                   q_lora_rank=cfg.q_lora_rank, latent_norm=True,
                   rms_norm_eps=float(attn.kv_a_layernorm.variance_epsilon))
    back = torch.argsort(interleave_order(torch.arange(p // 2)))  # engine rope rows -> our half-split rows
    state = {k: reorder_rope_rows(k, v, dims, back) for k, v in attn.state_dict().items()}
    state["rope_freq_idx"] = torch.arange(p // 2)
    return install_layer(model, i, dims, state)


def _record(model, path: Path, dims: list) -> dict:
    """Our export's own record (layers updated to the runtime's dims), or a minimal one for others'."""
    record = record_of(model)
    layers = [d.to_dict() for d in dims]
    if isinstance(record, dict) and "source" in record:
        return {**record, "layers": layers, "imported_from": str(path)}
    cfg = model.config
    mha_values = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    # the reference a cache saving is quoted against: the same heads with full K/V (MHA)
    source = {"name_or_path": str(path), "model_type": cfg.model_type, "kv_values_per_token_per_layer": mha_values}
    return {**make_record(source, {"method": "import", "format": cfg.model_type}, layers, 0.0),
            "imported_from": str(path)}
