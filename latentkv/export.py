"""Export a converted model as a stock DeepSeek-V3 checkpoint (transformers, vLLM, SGLang).

What makes the export compute the same function as our runtime (notes §4):
- softmax scale: engines use (n + p)^-0.5; the ratio to ours (the source's d^-0.5) is folded
  into the query rows;
- RoPE: engines rotate the p rope dims at rope_theta'^(-2j/p) in interleaved pairs. We keep
  source frequencies; when they are the m = p/2 fastest ones, theta' = theta^(p/d) reproduces
  them exactly (and llama3 scaling, a function of the wavelength only, carries over unchanged).
  Our half-split rows are permuted to the interleaved layout;
- the latent RMSNorm (`kv_a_layernorm`) must be in the model (see latent_norm.py);
- no q/kv/o biases, no sliding windows, one (r, p) for every layer, SiLU MLPs: otherwise the
  export refuses with the reason.
The MLP, norms and embeddings keep their names (Llama/Mistral/Qwen2 and a dense DeepSeek-V3 layer
share them). `config.json` carries our conversion record under `latentkv`, which engines ignore.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .errors import LatentKVError

FAST_KERNEL_DIMS = ((512, 64), (256, 64))  # (kv_lora_rank, qk_rope_head_dim) FlashMLA / FlashInfer / CUTLASS accept
FORMATS = ("deepseek_v3",)


def exportable_dims(model):
    """The one MLADims every layer shares, or a one-line error naming what cannot be exported."""
    from .conversion import record_of
    from .families import embedding_scale, logit_softcap
    from .mla import MLAAttention

    layers = [layer.self_attn for layer in model.model.layers]
    if record_of(model) is None or not all(isinstance(a, MLAAttention) for a in layers):
        raise LatentKVError("export needs a model converted by latentkv; run `latentkv convert` first")
    if logit_softcap(model.config) is not None or embedding_scale(model) != 1.0:
        raise LatentKVError(f"{model.config.model_type} layers soft-cap attention scores, scale embeddings and carry "
                            "extra norms, none of which DeepSeek-V3 has; use the native latentkv checkpoint instead")
    dims = {a.dims for a in layers}
    if len(dims) > 1:
        raise LatentKVError("per-layer ranks (--rank-allocation) have no DeepSeek-V3 form; convert with uniform ranks")
    d = dims.pop()
    if not d.latent_norm:
        raise LatentKVError("stock DeepSeek-V3 engines always normalise the latent, and this model has no latent norm; "
                            "convert with --latent-norm (or --target deepseek_v3)")
    if d.q_bias or d.kv_a_bias or d.o_bias:
        raise LatentKVError("the model has attention biases (Qwen2-style); DeepSeek-V3 projections in vLLM/SGLang have "
                            "none and a rotated key bias cannot be folded into weights, so it cannot be exported")
    if any(a.sliding_window for a in layers):
        raise LatentKVError("sliding-window layers have no DeepSeek-V3 form (it attends globally); export refuses "
                            "rather than change the function")
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise LatentKVError(f"MLP activation {model.config.hidden_act!r}: DeepSeek-V3 dense layers use silu")
    return d


def kept_frequencies(model) -> torch.Tensor:
    """(m,) source frequency index of each rope pair, the same in every layer, else an error."""
    idx = [layer.self_attn.rope_freq_idx for layer in model.model.layers]
    if any(not torch.equal(i, idx[0]) for i in idx):
        raise LatentKVError("layers keep different RoPE frequencies; DeepSeek-V3 has one rope_theta. "
                            "Convert with --rope rorope-export (or --target deepseek_v3)")
    return idx[0]


def rope_parameters(model, m: int) -> dict:
    """The rope_parameters that make a p = 2m dim DeepSeek-V3 rotary reproduce the source's m fastest
    frequencies; refuses when the source's rotation is not of that form."""
    from .families import _rope_type, rope_frequencies

    params = dict(getattr(model.config, "rope_parameters", None) or {})
    rope_type = _rope_type(model.config)
    theta = params.get("rope_theta", getattr(model.config, "rope_theta", 10000.0))
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    params.update(rope_type=rope_type, rope_theta=float(theta) ** (2 * m / d))
    got = _engine_frequencies(params, 2 * m, model.config.max_position_embeddings)
    want = rope_frequencies(model.config)[:m].float()
    if not torch.allclose(got, want, rtol=1e-5, atol=0):
        raise LatentKVError(f"the source's {rope_type} RoPE frequencies cannot be expressed with rope_theta for "
                            f"qk_rope_head_dim {2 * m}; DeepSeek-V3 cannot run this model")
    return params


def _engine_frequencies(params: dict, p: int, max_positions: int) -> torch.Tensor:
    """(p/2,) inv_freq exactly as transformers' DeepSeek-V3 rotary computes it from `params`."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=1, qk_rope_head_dim=p, rope_parameters=dict(params),
                           max_position_embeddings=max_positions)
    return DeepseekV3RotaryEmbedding(cfg).inv_freq.float()


def interleave_order(freq_idx: torch.Tensor) -> torch.Tensor:
    """(p,) rows of our half-split rope block (pair k = rows k, k + m) in DeepSeek's interleaved order
    (pair j = rows 2j, 2j + 1), pairs sorted by frequency (fastest first)."""
    m = freq_idx.numel()
    order = torch.argsort(freq_idx)
    return torch.stack((order, order + m), 1).reshape(-1)


def reorder_rope_rows(name: str, t: torch.Tensor, dims, order: torch.Tensor) -> torch.Tensor:
    """A query (per head: n nope rows, then p rope rows) or kv_a (r latent rows, then p rope rows)
    weight with its rope rows taken in `order`; any other tensor unchanged. Used both ways: to the
    engine's interleaved layout on export, back to ours on import."""
    n, p, h = dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.num_heads
    if name.endswith(("q_proj.weight", "q_b_proj.weight")):
        w = t.view(h, n + p, -1)
        return torch.cat((w[:, :n], w[:, n:][:, order]), 1).reshape(h * (n + p), -1)
    if name.endswith("kv_a_proj_with_mqa.weight"):
        return torch.cat((t[: dims.kv_lora_rank], t[dims.kv_lora_rank:][order]))
    return t


def _engine_config(model, dims, rope: dict) -> dict:
    from transformers import DeepseekV3Config

    src = model.config
    cfg = DeepseekV3Config(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        moe_intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_heads,
        # dense model: every layer is below first_k_dense_replace, so no MoE is built
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=src.num_hidden_layers, routed_scaling_factor=1.0,
        kv_lora_rank=dims.kv_lora_rank, q_lora_rank=dims.q_lora_rank, qk_rope_head_dim=dims.qk_rope_head_dim,
        qk_nope_head_dim=dims.qk_nope_head_dim, v_head_dim=dims.v_head_dim, hidden_act="silu",
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)), rope_parameters=rope,
        rope_interleave=True, attention_bias=False, num_mtp_layers=0,
    )
    out = cfg.to_dict()
    out.update(architectures=["DeepseekV3ForCausalLM"], moe_layer_freq=1, num_nextn_predict_layers=0,
               dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
               # older readers (vLLM, SGLang) take RoPE from these two keys
               rope_theta=rope["rope_theta"],
               rope_scaling=None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"})
    return out


def engine_state(model, dims, freq_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 tensors: attention rows folded/permuted, everything else under its own name."""
    order = interleave_order(freq_idx)
    alpha = dims.softmax_scale * math.sqrt(dims.qk_nope_head_dim + dims.qk_rope_head_dim)  # ours / engine's scale
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(("rope_freq_idx", "rotary_emb.inv_freq")):
            continue
        t = reorder_rope_rows(name, t.detach(), dims, order).clone().contiguous()
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            t *= alpha
        out[name] = t
    if "lm_head.weight" not in out:  # tied: vLLM's DeepSeek loader reads lm_head.weight itself
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def kernel_warning(dims) -> str | None:
    if (dims.kv_lora_rank, dims.qk_rope_head_dim) in FAST_KERNEL_DIMS:
        return None
    shapes = " or ".join(f"{r}+{p}" for r, p in FAST_KERNEL_DIMS)
    return (f"warning: kv_lora_rank {dims.kv_lora_rank} + qk_rope_head_dim {dims.qk_rope_head_dim} is not a shape the "
            f"fast MLA kernels (FlashMLA, FlashInfer, CUTLASS MLA) take ({shapes}); engines fall back to slower "
            "backends or may refuse it")


def export(model, out: str | Path, tokenizer=None, fmt: str = "deepseek_v3", overwrite: bool = False,
           max_shard_size: str | int = "5GB") -> Path:
    """Write `model` (a latentkv conversion, or a path to one) as a stock checkpoint; atomic."""
    from .atomic import atomic_output_dir, check_output_dir
    from .conversion import record_of

    if fmt not in FORMATS:
        raise LatentKVError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    check_output_dir(out, overwrite)
    if isinstance(model, (str, Path)):
        from .loading import load_model

        model, tokenizer = load_model(model)
    dims = exportable_dims(model)
    freq_idx = kept_frequencies(model)
    config = _engine_config(model, dims, rope_parameters(model, freq_idx.numel()))
    config["latentkv"] = record_of(model)
    warning = kernel_warning(dims)
    if warning:
        print(warning, file=sys.stderr)
    state = engine_state(model, dims, freq_idx)
    with atomic_output_dir(out, overwrite) as tmp:
        _write_shards(state, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _write_shards(state: dict, folder: Path, max_shard_size) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({k: state[k] for k in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
