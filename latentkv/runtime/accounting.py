"""Cache accounting: values and bytes per token, per layer, for a model and for its source."""

from __future__ import annotations

from ..families import source_layout
from ..record import record_of


def cache_report(model) -> dict:
    """Cache size per token of `model` and of its source, at the model's parameter dtype.

    Keys: architecture, dtype, bytes_per_value, num_layers, source {values_per_token_per_layer,
    bytes_per_token_per_layer, bytes_per_token}, model {same, per layer lists}, ratio, record.
    """
    size = next(model.parameters()).element_size()
    record = record_of(model)
    if record is None:
        layout = source_layout(model.config)
        src_values, layers = layout.kv_values_per_token, [layout.kv_values_per_token] * layout.num_layers
        arch = f"{model.config.model_type} (source, GQA/MHA)"
    else:
        src = record["source"]
        src_values = src["kv_values_per_token_per_layer"]
        layers = [d["kv_lora_rank"] + d["qk_rope_head_dim"] + d.get("key_scales", 0) for d in record["layers"]]  # QK-norm scales too
        arch = f"MLA converted from {src['model_type']} ({record['conversion']['method']})"
    n = len(layers)
    return {
        "architecture": arch,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "bytes_per_value": size,
        "num_layers": n,
        "source": {"values_per_token_per_layer": src_values, "bytes_per_token_per_layer": src_values * size,
                   "bytes_per_token": src_values * size * n},
        "model": {"values_per_token_per_layer": layers, "bytes_per_token_per_layer": [v * size for v in layers],
                  "bytes_per_token": sum(layers) * size},
        "ratio": sum(layers) / (src_values * n),
        "record": record,
    }
