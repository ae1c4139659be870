"""Cache accounting: values and bytes per token, per layer, for a model and for its source."""

from __future__ import annotations

from .conversion import record_of
from .families import source_layout


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
        layers = [d["kv_lora_rank"] + d["qk_rope_head_dim"] for d in record["layers"]]
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


def record_summary(record: dict) -> dict:
    """The headline numbers of a conversion record: first layer's dims, cache values, ratio, time."""
    first = record["layers"][0]
    values = [d["kv_lora_rank"] + d["qk_rope_head_dim"] for d in record["layers"]]
    src = record["source"]["kv_values_per_token_per_layer"]
    return {"kv_lora_rank": first["kv_lora_rank"], "qk_rope_head_dim": first["qk_rope_head_dim"],
            "qk_nope_head_dim": first["qk_nope_head_dim"], "cache_values_per_token_per_layer": values[0],
            "source_values_per_token_per_layer": src, "ratio": sum(values) / (src * len(values)),
            "convert_seconds": record["convert_seconds"], "split_search": record.get("split_search")}


def write_section(path, section: str, body: str) -> None:
    """Replace the `<!-- quality:section -->` block of a Markdown file (or append it), atomically.
    `body` must carry its own start and end markers."""
    from pathlib import Path

    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table names the command that made it.\n"
    start, end = f"<!-- quality:{section} -->", f"<!-- /quality:{section} -->\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)
