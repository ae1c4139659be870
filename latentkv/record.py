"""The conversion record: how a converted model was made, kept in `config.latentkv`.

It travels with the model: the native checkpoint writes it to `latentkv.json` and the DeepSeek-V3
export to `config.json["latentkv"]`. Keys: format_version, latentkv_version, conversion (the
config as a dict, `conversion.configs.config_to_dict`), source (`SourceLayout.to_record`),
layers (one `MLADims.to_dict()` per layer), split_search, convert_seconds; optional ones added
by later steps (latent_norm, streaming, heal, imported_from).
"""

from __future__ import annotations

from . import __version__

FORMAT_VERSION = 1


def make_record(source: dict, conversion: dict, layers: list[dict], seconds: float,
                split_search: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "latentkv_version": __version__,
        "conversion": conversion,
        "source": source,
        "layers": layers,
        "split_search": split_search,
        "convert_seconds": round(seconds, 3),
    }


def record_of(model) -> dict | None:
    """The conversion record of a converted model, None for a source model."""
    return getattr(model.config, "latentkv", None)


def record_summary(record: dict) -> dict:
    """The headline numbers of a conversion record: first layer's dims, cache values, ratio, time."""
    first = record["layers"][0]
    values = [d["kv_lora_rank"] + d["qk_rope_head_dim"] + d.get("key_scales", 0) for d in record["layers"]]
    src = record["source"]["kv_values_per_token_per_layer"]
    return {"kv_lora_rank": first["kv_lora_rank"], "qk_rope_head_dim": first["qk_rope_head_dim"],
            "qk_nope_head_dim": first["qk_nope_head_dim"], "cache_values_per_token_per_layer": values[0],
            "source_values_per_token_per_layer": src, "ratio": sum(values) / (src * len(values)),
            "convert_seconds": record["convert_seconds"], "split_search": record.get("split_search")}


def bias_folds(record: dict | None) -> dict | None:
    """What an export-grade conversion approximated of the source's attention biases (`conversion.biases`),
    from the latent-norm fit reports wherever the record keeps them: None when nothing was folded.

    -> {"layers": how many layers had biases, "query_bias"/"rope_key_bias"/"value_bias": how each went
    (folded / carrier), "constant_residual": mean over those layers of E(1 - a.x)^2, the share of a
    folded bias the export misses; "kv_b_relative_error": mean refit error there (the value bias
    rides the carrier in it)}."""
    if not record:
        return None
    fits = [*((record.get("latent_norm") or (record.get("split_search") or {}).get("latent_norm") or {})
              .get("layers", [])),
            *(x["latent_norm"] for x in (record.get("streaming") or {}).get("layers", []) if "latent_norm" in x)]
    folded = [f for f in fits if f and f.get("biases")]
    if not folded:
        return None
    out = {"layers": len(folded)}
    for kind in ("query_bias", "rope_key_bias", "value_bias"):
        ways = sorted({f["biases"][kind] for f in folded if kind in f["biases"]})
        if ways:
            out[kind] = "/".join(ways)
    for key, where in (("constant_residual", "biases"), ("kv_b_relative_error", None)):
        vals = [(f[where] if where else f)[key] for f in folded]
        out[key] = sum(vals) / len(vals)
    return out
