"""Streaming conversion from sharded safetensors: same result as in memory, resumable, bad input."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

from latentkv import convert
from latentkv.conversion.configs import ExactConfig, LowRankConfig, SVDConfig, make_config
from latentkv.conversion.streaming import Stream, convert_streaming
from latentkv.errors import LatentKVError
from latentkv.families import sliding_window
from latentkv.io.shards import ShardedCheckpoint
from latentkv.runtime.checkpoint import load

from conftest import SAMPLE, make_tiny


def sharded(tmp_path, name="llama-gqa", layers=3, tokenizer=None, dtype=torch.float32, **overrides):
    """A tiny source saved as several safetensors shards (+ index), like a hub checkpoint."""
    model = make_tiny(name, layers=layers, dtype=dtype, **overrides)
    src = tmp_path / f"src-{name}"
    model.save_pretrained(src, max_shard_size="60KB")
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").is_file()
    if tokenizer is not None:
        tokenizer.save_pretrained(src)
    return model, src


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE * 3)
    return str(path)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def lowrank(calib, **kw):
    """Streaming folds a given logit factor but fits no temperatures (that needs the whole model)."""
    return LowRankConfig(**{"kv_lora_rank": 24, "qk_rope_head_dim": 8, "calib": calib, "calib_samples": 6,
                            "calib_seq_len": 32, "attn_temperature": 1.0, "head_temperatures": False, **kw})


CASES = {
    "exact": lambda c: ExactConfig(),
    "svd": lambda c: SVDConfig(kv_lora_rank=20, qk_rope_head_dim=8),
    "lowrank": lambda c: lowrank(c),
    "lowrank-sequential": lambda c: lowrank(c, sequential=True),
    "lowrank-elite": lambda c: lowrank(c, rope="elite"),  # scores pairs on kept layer-input windows
    "lowrank-elite-sequential": lambda c: lowrank(c, rope="elite", sequential=True),
    "lowrank-target": lambda c: lowrank(c, rope="rorope-export", latent_norm=True, qk_rope_head_dim=4),
    "lowrank-temperature": lambda c: lowrank(c, attn_temperature=1.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_equals_in_memory(tmp_path, tiny_tokenizer, calib, ids, case):
    model, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    config = CASES[case](calib)
    ref = convert(model, config, tokenizer=tiny_tokenizer, progress=False)
    record = convert_streaming(src, config, tmp_path / "out", progress=False)
    got, tok = load(tmp_path / "out")
    assert tok is not None and not (tmp_path / "out.partial").exists()
    assert [d.to_dict() for d in (layer.self_attn.dims for layer in got.model.layers)] == record["layers"]
    a, b = logits_of(ref, ids), logits_of(got, ids)
    assert (a - b).abs().max() < 2e-4 * a.abs().max(), case
    if case == "exact":  # and the exact embedding is still the source's function
        assert (logits_of(model, ids) - b).abs().max() < 1e-4 * a.abs().max()


@pytest.mark.parametrize("family", ["qwen2-bias", "mistral-sliding", "llama3-rope", "llama-mha", "gemma2-softcap",
                                    "qwen3-qknorm", "gemma3-qknorm", "olmo2-qknorm", "phi3-fused", "smollm3-nope"])
def test_streaming_families(tmp_path, tiny_tokenizer, calib, ids, family):
    model, src = sharded(tmp_path, family, layers=2, tokenizer=tiny_tokenizer)
    config = lowrank(calib)
    if family == "qwen3-qknorm":  # per-KV-head key scales: RoRoPE's head mixing is refused
        config = replace(config, rope="2norm")
    ref = convert(model, config, tokenizer=tiny_tokenizer, progress=False)
    convert_streaming(src, config, tmp_path / "out", progress=False)
    got, _ = load(tmp_path / "out")
    a, b = logits_of(ref, ids), logits_of(got, ids)
    assert (a - b).abs().max() < 2e-4 * a.abs().max()
    for i, layer in enumerate(model.model.layers):  # each layer keeps its own window (Gemma-2 alternates)
        assert got.model.layers[i].self_attn.sliding_window == sliding_window(model.config, layer.self_attn, i)
    if family in ("gemma2-softcap", "gemma3-qknorm"):
        assert [a.self_attn.sliding_window for a in got.model.layers] == [8, None]


def test_tied_embeddings(tmp_path, tiny_tokenizer, calib, ids):
    """Llama-3.2 / SmolLM style: no lm_head tensor in the shards, the head reads the embeddings."""
    model, src = sharded(tmp_path, "llama3-rope", layers=2, tokenizer=tiny_tokenizer, tie_word_embeddings=True)
    assert not any("lm_head" in n for n in ShardedCheckpoint(src).names())
    config = lowrank(calib)
    ref = convert(model, config, tokenizer=tiny_tokenizer, progress=False)
    convert_streaming(src, config, tmp_path / "out", progress=False)
    got, _ = load(tmp_path / "out")
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    a, b = logits_of(ref, ids), logits_of(got, ids)
    assert (a - b).abs().max() < 2e-4 * a.abs().max()


def test_bf16_source_stays_bf16(tmp_path, tiny_tokenizer, calib):
    _, src = sharded(tmp_path, tokenizer=tiny_tokenizer, dtype=torch.bfloat16)
    convert_streaming(src, lowrank(calib), tmp_path / "out", progress=False)
    from safetensors import safe_open

    shard = tmp_path / "out" / "layer-00001.safetensors"
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").dtype == torch.bfloat16
    got, _ = load(tmp_path / "out")
    assert torch.isfinite(logits_of(got, torch.arange(20)[None])).all()


def test_budget_takes_the_streaming_split(tmp_path, tiny_tokenizer, calib, caplog):
    caplog.set_level(logging.INFO, logger="latentkv")
    _, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    cfg = LowRankConfig(kv_budget=0.5, calib=calib, calib_samples=6, calib_seq_len=32)
    record = convert_streaming(src, cfg, tmp_path / "out", progress=False)
    first = record["layers"][0]
    assert first["kv_lora_rank"] + first["qk_rope_head_dim"] == 32  # half of keys + values: 2 * 2 heads * 16
    assert "split search needs the whole model" in caplog.text


def test_interrupted_conversion_resumes_to_the_same_result(tmp_path, tiny_tokenizer, calib, ids, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="latentkv")
    _, src = sharded(tmp_path, layers=4, tokenizer=tiny_tokenizer)
    config = lowrank(calib, sequential=True)
    convert_streaming(src, config, tmp_path / "whole", progress=False)
    step = Stream.step

    def dies_at_2(self, i, dims):
        if i == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a kill between layers leaves behind
        return step(self, i, dims)

    monkeypatch.setattr(Stream, "step", dies_at_2)
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, config, tmp_path / "out", progress=True)
    assert not (tmp_path / "out").exists()  # never a half-written output
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["done"] == 2
    monkeypatch.setattr(Stream, "step", step)
    calls = []
    monkeypatch.setattr(Stream, "step", lambda self, i, dims: calls.append(i) or step(self, i, dims))
    convert_streaming(src, config, tmp_path / "out", progress=True)
    assert calls == [2, 3] and "resuming the interrupted conversion" in caplog.text
    a, b = logits_of(load(tmp_path / "whole")[0], ids), logits_of(load(tmp_path / "out")[0], ids)
    assert torch.equal(a, b)


def test_leftovers_of_other_settings_are_discarded(tmp_path, tiny_tokenizer, calib, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="latentkv")
    _, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    monkeypatch.setattr(Stream, "free", lambda self, i: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert_streaming(src, lowrank(calib), tmp_path / "out", progress=False)
    monkeypatch.undo()
    (tmp_path / "out.partial" / "layer-00000.safetensors").write_bytes(b"garbage")  # a half-written shard
    record = convert_streaming(src, SVDConfig(kv_lora_rank=20, qk_rope_head_dim=8), tmp_path / "out")
    assert "discarding" in caplog.text and record["conversion"]["method"] == "svd"
    load(tmp_path / "out")


def test_bad_checkpoints_say_what_is_wrong(tmp_path, tiny_tokenizer, calib):
    model, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    shards = sorted(src.glob("model-*.safetensors"))
    cfg = lowrank(calib)

    def fails(match):
        with pytest.raises(LatentKVError, match=match):
            convert_streaming(src, cfg, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()

    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    fails("corrupt or truncated")
    shards[1].unlink()
    fails("is missing")
    shards[1].write_bytes(data)
    (src / "model.safetensors.index.json").write_text("{not json")
    fails("unreadable")
    (src / "model.safetensors.index.json").unlink()
    fails("no model.safetensors")


def test_bad_inputs(tmp_path, tiny_tokenizer, calib):
    model, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    with pytest.raises(LatentKVError, match="rank-allocation sensitivity scores the whole converted model"):
        convert_streaming(src, lowrank(calib, rank_allocation="sensitivity"), tmp_path / "o1")
    with pytest.raises(LatentKVError, match="rank-allocation spectrum ranks every layer's singular values"):
        convert_streaming(src, lowrank(calib, rank_allocation="spectrum"), tmp_path / "o1")
    with pytest.raises(LatentKVError, match="does not belong"):
        convert_streaming(src, lowrank(calib), tmp_path / "o2", calib_ids=torch.full((5, 32), 10_000))
    (tmp_path / "exists").mkdir()
    with pytest.raises(LatentKVError, match="--overwrite"):
        convert_streaming(src, ExactConfig(), tmp_path / "exists")
    bad = make_tiny("llama-gqa", layers=3)
    with torch.no_grad():
        bad.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan", max_shard_size="60KB")
    with pytest.raises(LatentKVError, match="layer 1 .*not finite"):
        convert_streaming(tmp_path / "nan", ExactConfig(), tmp_path / "o3", progress=False)
    with pytest.raises(LatentKVError, match="no tokenizer files"):
        convert_streaming(tmp_path / "nan", lowrank(calib), tmp_path / "o4", progress=False)
    with pytest.raises(LatentKVError, match="export-grade .*per-token 1/rms"):
        make_tiny("qwen3-qknorm").save_pretrained(tmp_path / "qwen3")
        convert_streaming(tmp_path / "qwen3", make_config(kv_budget=0.5, target="deepseek_v3"), tmp_path / "o5",
                          progress=False)


def test_cli_stream_disk_full_then_resume(tmp_path, tiny_tokenizer, calib, monkeypatch, capsys):
    import errno

    from latentkv.cli import main
    from latentkv.io.shards import ShardWriter

    _, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    argv = ["convert", str(src), "--stream", "--method", "svd", "--kv-lora-rank", "20", "--qk-rope-head-dim", "8",
            "--out", str(tmp_path / "out"), "--json"]
    write = ShardWriter.write

    def full_at_layer_2(self, file, tensors):
        if file == "layer-00002.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / file))
        return write(self, file, tensors)

    monkeypatch.setattr(ShardWriter, "write", full_at_layer_2)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "No space left on device" in err[-1]
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(ShardWriter, "write", write)
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "resuming the interrupted conversion" in out.err and "at layer 2" in out.err
    result = json.loads(out.out)
    assert result["cache_values_per_token_per_layer"] == 28 and result["streaming"]["peak_rss_gib"] > 0


def test_cli_refuses_in_memory_conversion_that_cannot_fit(tmp_path, monkeypatch, capsys):
    from latentkv.cli import main
    from latentkv.conversion import streaming

    _, src = sharded(tmp_path)
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    assert main(["convert", str(src), "--method", "svd", "--kv-budget", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "add --stream" in capsys.readouterr().err


def test_streaming_says_it_does_not_refit_outputs(tmp_path, tiny_tokenizer, calib, caplog):
    _, src = sharded(tmp_path, tokenizer=tiny_tokenizer)
    with caplog.at_level("WARNING", logger="latentkv"):
        record = convert_streaming(src, lowrank(calib, output_refit=True), tmp_path / "out", progress=False)
    assert record["conversion"]["output_refit"] is False
    assert any("o_proj is not refit" in r.getMessage() for r in caplog.records)
