"""The model card (`README.md`) an export carries: what it is, what it saves, how to serve and rebuild it.

Everything comes from the conversion record (config.json's `latentkv`) and the export's dims, so the
card states only what was measured or chosen; numbers the record does not hold are left out.
"""

from __future__ import annotations

from .layout import kernel_warning

# the bundled models' hub ids and licenses (other sources: their own name; the license is theirs)
BUNDLED = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", "apache-2.0"), "gemma3-270m": ("google/gemma-3-270m", "gemma")}


def model_card(record: dict, dims, num_layers: int, value_bytes: int = 2) -> str:
    """record: the conversion record; dims: the export's MLADims; value_bytes: bytes per cached value as
    served (bf16: 2) -> the card's Markdown, YAML front matter first."""
    src = record["source"]
    base, license_ = BUNDLED.get(src["name_or_path"], (src["name_or_path"], "other"))
    conv = record["conversion"]
    latent = dims.kv_lora_rank + dims.qk_rope_head_dim
    source_values = src["kv_values_per_token_per_layer"]
    lines = ["---", *([f"base_model: {base}"] if "/" in base else []), f"license: {license_}",
             "library_name: transformers", "tags:", "- latentkv", "- mla", "- deepseek_v3", "- kv-cache-compression",
             "---", "", f"# {base}, Multi-head Latent Attention ({latent / source_values:.0%} KV cache)", "",
             f"This is `{base}` converted by [latentkv](https://pypi.org/project/latentkv/) from grouped-query "
             "attention to DeepSeek-V3's Multi-head Latent Attention: each token caches a "
             f"{dims.kv_lora_rank}-value latent and a {dims.qk_rope_head_dim}-value shared rope key per layer "
             f"instead of {source_values} key/value values. It loads in stock transformers, vLLM and SGLang as "
             "`DeepseekV3ForCausalLM` (no remote code). The license is the base model's"
             + ("" if license_ != "other" else " (see its card)") + ".", "",
             "## What was done", "",
             f"- method: `{conv['method']}`, budget {conv.get('kv_budget')}, RoPE strategy `{conv.get('rope')}`, "
             f"latent norm fitted: {bool(conv.get('latent_norm'))}, calibration: `{conv.get('calib')}` "
             f"({conv.get('calib_samples')} x {conv.get('calib_seq_len')} tokens)",
             f"- ranks: kv_lora_rank {dims.kv_lora_rank}, qk_rope_head_dim {dims.qk_rope_head_dim}, "
             f"qk_nope_head_dim {dims.qk_nope_head_dim}, v_head_dim {dims.v_head_dim}, {num_layers} layers",
             f"- KV cache per token: {latent * value_bytes * num_layers:,} bytes against the base model's "
             f"{source_values * value_bytes * num_layers:,} ({latent / source_values:.1%}), at {value_bytes} bytes "
             "per value"]
    lines += _measured(record)
    lines += ["", "## Serve", "", "```bash",
              "# transformers (caches only the latent; expands K/V every step)",
              "python -c \"from transformers import pipeline; print(pipeline('text-generation', model='THIS_DIR')('Hello'))\"",
              "vllm serve THIS_DIR                           # add --kv-cache-dtype fp8 for an fp8 latent cache",
              "python -m sglang.launch_server --model-path THIS_DIR", "```", ""]
    note = kernel_warning(dims)
    lines.append(f"Kernel shapes: {note}." if note else "Kernel shapes: kv_lora_rank + qk_rope_head_dim is one the fast "
                 "MLA kernels take.")
    lines += ["", "## Reproduce", "", "```bash", _command(record), "latentkv export CONVERTED --out THIS_DIR",
              "latentkv verify-export THIS_DIR --against CONVERTED", "```", ""]
    return "\n".join(lines)


def _measured(record: dict) -> list[str]:
    """Lines for what the record measured: a heal, the latent-norm fit, folded biases."""
    out = []
    heal = record.get("heal")
    if heal:
        out.append(f"- healed: {heal.get('tokens', '?'):,} distillation tokens (`latentkv heal`, data `{heal.get('data')}`), "
                   f"KL {heal.get('first_loss', float('nan')):.3f} -> {heal.get('last_loss', float('nan')):.3f}")
    search = record.get("split_search") or {}
    if "heldout_nll" in search:
        out.append(f"- held-out calibration NLL of the chosen split: {search['heldout_nll']:.3f}")
    return out


def _command(record: dict) -> str:
    conv = record["conversion"]
    flags = [f"--kv-budget {conv['kv_budget']}" if conv.get("kv_budget") else
             f"--kv-lora-rank {conv.get('kv_lora_rank')} --qk-rope-head-dim {conv.get('qk_rope_head_dim')}"]
    if conv.get("latent_norm") and conv.get("rope") == "rorope-export":
        flags.append("--target deepseek_v3")
    if conv.get("preset"):
        flags.append(f"--preset {conv['preset']}")
    return f"latentkv convert {record['source']['name_or_path']} --out CONVERTED " + " ".join(flags)
