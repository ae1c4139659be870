"""--dtype and --cache-dtype through the CLI: bf16 checkpoints round-trip and export, quantized caches in
eval/generate/bench, one-line refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from latentkv import load_model
from latentkv.cli import main

from conftest import SAMPLE, make_tiny, run_cli


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory, tiny_tokenizer):
    """A tiny source stored in bf16, as most hub checkpoints are."""
    d = tmp_path_factory.mktemp("src") / "tiny-bf16"
    make_tiny("llama-gqa", layers=2).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    (d.parent / "sample.txt").write_text(SAMPLE * 3)
    return d


run = run_cli


def stored(path) -> set:
    with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64", "I32"}  # index buffers keep their type


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_bf16_source_converts_exports_and_loads_stock_as_bf16(capsys, bf16_source, tmp_path, tiny_tokenizer, name):
    """A bf16 source (Qwen2: with its biases folded for the export) -> a bf16 conversion and export that
    stock transformers loads as bf16 and computes as our runtime does."""
    if name != "llama-gqa":
        bf16_source = tmp_path / name
        make_tiny(name, layers=2).to(torch.bfloat16).save_pretrained(bf16_source)
        tiny_tokenizer.save_pretrained(bf16_source)
        (tmp_path / "sample.txt").write_text(SAMPLE * 3)
    conv, ds = tmp_path / "mla", tmp_path / "ds"
    text = bf16_source.parent / "sample.txt"
    code, _, err = run(capsys, "convert", bf16_source, "--out", conv, "--kv-budget", 0.5, "--target", "deepseek_v3",
                       "--calib", text, "--calib-samples", 4, "--calib-seq-len", 32)
    assert code == 0, err
    assert stored(conv) == {"BF16"}  # the checkpoint keeps the source's dtype (auto)
    model, _ = load_model(conv, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert run(capsys, "export", conv, "--out", ds)[0] == 0
    assert stored(ds) == {"BF16"}
    code, stdout, err = run(capsys, "verify-export", ds, "--against", conv, "--dtype", "bfloat16", "--atol", 0.5,
                            "--tokens", 32, "--json")
    res = json.loads(stdout)
    assert code == 0 and res["dtype"] == "bfloat16" and res["passed"], json.dumps(res)
    code, stdout, _ = run(capsys, "convert", bf16_source, "--out", tmp_path / "f32", "--kv-budget", 0.5,
                          "--method", "svd", "--dtype", "float32", "--json")
    assert code == 0 and stored(tmp_path / "f32") == {"F32"}


def test_eval_in_bf16_and_with_a_quantized_cache(capsys, bf16_source, tmp_path):
    conv = tmp_path / "mla"
    assert run(capsys, "convert", bf16_source, "--out", conv, "--kv-budget", 0.5, "--method", "svd")[0] == 0
    text = bf16_source.parent / "sample.txt"
    rows = {}
    for args in (["--dtype", "float32"], ["--dtype", "bfloat16"], ["--dtype", "float32", "--cache-dtype", "int8"],
                 ["--dtype", "float32", "--cache-dtype", "int4", "--cache-group", 8, "--cache-rope"]):
        code, stdout, err = run(capsys, "eval", conv, "--ppl", text, "--seq-len", 32, "--max-windows", 2, "--json", *args)
        assert code == 0, err
        rows[" ".join(map(str, args))] = json.loads(stdout)
    f32 = rows["--dtype float32"]
    assert rows["--dtype bfloat16"]["dtype"] == "bfloat16" and f32["dtype"] == "float32"
    for key, row in rows.items():
        assert abs(row["nll"] - f32["nll"]) < 0.1, key  # close, and the int8 cache closest
    assert rows["--dtype float32 --cache-dtype int8"]["cache_dtype"] == "int8"
    assert abs(rows["--dtype float32 --cache-dtype int8"]["nll"] - f32["nll"]) < 0.01


def test_generate_and_bench_over_a_quantized_cache(capsys, bf16_source, tmp_path):
    conv = tmp_path / "mla"
    assert run(capsys, "convert", bf16_source, "--out", conv, "--kv-budget", 0.5, "--method", "svd")[0] == 0
    code, stdout, err = run(capsys, "generate", conv, "The quick brown", "--max-new-tokens", 4, "--cache-dtype", "fp8_e4m3",
                            "--json")
    assert code == 0 and len(json.loads(stdout)["tokens"][0]) == 4, err
    code, stdout, err = run(capsys, "bench", conv, "--context", 16, "--batch", 1, "--new-tokens", 2, "--cache-dtype",
                            "int8", "--out", tmp_path / "b", "--json", "--dtype", "float32")
    assert code == 0, err
    rows = [r for r in json.loads(stdout)["rows"] if "skipped" not in r]
    for r in rows:  # int8 latent: r codes + one fp16 scale per token and layer; the rope key stays fp32
        assert r["cache_dtype"] == "int8" and r["cache_bytes"] == r["cache_bytes_formula"]
    d = load_model(conv, dtype="float32")[0].model.layers[0].self_attn.dims
    assert rows[0]["cache_bytes_per_token"] == 2 * (d.kv_lora_rank + 2 + 4 * d.qk_rope_head_dim)


@pytest.mark.parametrize("argv, match", [
    (["eval", "{conv}", "--passkey", "--cache-dtype", "int8"], "--cache-dtype applies to --ppl"),
    (["generate", "{src}", "hi", "--cache-dtype", "int8"], "source model"),
    (["eval", "{conv}", "--ppl", "{text}", "--cache-dtype", "fp8_e4m3", "--cache-group", "8"], "needs an int"),
    (["convert", "{src}", "--out", "{tmp}/o", "--stream", "--dtype", "float32"], "--stream writes"),
    (["generate", "{conv}", "hi", "--device", "cuda"], "no CUDA GPU is visible"),
    (["eval", "{conv}", "--ppl", "{text}", "--device", "gpu0"], "unknown --device 'gpu0'"),
])
def test_dtype_errors_are_one_line(capsys, bf16_source, tmp_path, argv, match):
    conv = tmp_path / "mla"
    assert run(capsys, "convert", bf16_source, "--out", conv, "--kv-budget", 0.5, "--method", "svd")[0] == 0
    argv = [a.format(conv=conv, src=bf16_source, text=bf16_source.parent / "sample.txt", tmp=tmp_path) for a in argv]
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, err


def test_bad_dtype_is_refused_by_the_parser(capsys, bf16_source):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(bf16_source), "--ppl", "x", "--dtype", "float8"])
    assert e.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_push_dry_run_lists_and_offline_is_one_line(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / ".lock").write_text("")  # hidden: never uploaded
    code, stdout, err = run(capsys, "push", folder, "--repo-id", "me/tiny-mla", "--dry-run", "--json")
    res = json.loads(stdout)
    assert code == 0 and res["dry_run"] and [f["path"] for f in res["files"]] == ["config.json", "model.safetensors"]
    assert res["bytes"] == 102
    code, _, err = run(capsys, "push", folder, "--repo-id", "nonsense")
    assert code == 2 and "OWNER/NAME" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "push", folder, "--repo-id", "me/tiny-mla")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "could not push to me/tiny-mla" in lines[0] and "Traceback" not in err


def test_stream_hub_id_offline_is_one_line(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run(capsys, "convert", "nobody/no-such-model", "--stream", "--kv-budget", 0.5, "--out", tmp_path / "o")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "could not get nobody/no-such-model from the hub" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and "Traceback" not in err


def test_stream_takes_a_hub_snapshot(monkeypatch, tmp_path):
    """A hub id resolves to its snapshot directory (safetensors and configs only)."""
    import huggingface_hub

    from latentkv.io.hub import SNAPSHOT_PATTERNS, local_snapshot

    seen = {}

    def fake(repo_id, allow_patterns):
        seen.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert local_snapshot("org/model") == tmp_path
    assert seen == {"repo_id": "org/model", "patterns": SNAPSHOT_PATTERNS} and "*.bin" not in SNAPSHOT_PATTERNS


def test_verify_with_vllm_skips_without_a_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check runs for real there")
    code, stdout, _ = run(capsys, "verify-export", tmp_path / "ds", "--against", tmp_path / "mla", "--engine", "vllm",
                          "--kv-cache-dtype", "fp8", "--json")
    assert code == 0 and json.loads(stdout)["skipped"] == "no CUDA GPU on this machine"


def test_heal_sweep_and_demo_take_dtype(capsys, bf16_source, tmp_path):
    """heal writes the student's stored dtype (auto) or --dtype, training in float32; sweep and demo
    evaluate every row in --dtype (cache bytes follow) while the conversions compute in float32."""
    from latentkv.cli.demo import run_demo

    conv, text = tmp_path / "mla", bf16_source.parent / "sample.txt"
    assert run(capsys, "convert", bf16_source, "--out", conv, "--kv-budget", 0.5, "--method", "svd")[0] == 0
    assert stored(conv) == {"BF16"}
    small = ["--teacher", bf16_source, "--data", text, "--tokens", 64, "--seq-len", 16, "--batch-size", 2, "--json"]
    for dtype, want in (("auto", "BF16"), ("float32", "F32")):
        code, _, err = run(capsys, "heal", conv, "--out", tmp_path / f"healed-{dtype}", "--dtype", dtype, *small)
        assert code == 0, err
        assert stored(tmp_path / f"healed-{dtype}") == {want}
    values = {}
    for dtype in ("auto", "float32"):
        code, stdout, err = run(capsys, "sweep", bf16_source, "--out", tmp_path / f"sweep-{dtype}", "--budgets", "1,0.5",
                                "--methods", "svd", "--ppl", text, "--seq-len", 32, "--max-windows", 2, "--json",
                                "--dtype", dtype)
        assert code == 0, err
        values[dtype] = res = json.loads(stdout)
        assert res["dtype"] == ("bfloat16" if dtype == "auto" else "float32")
    for key in ("source", "rows"):
        a, b = values["auto"][key], values["float32"][key]
        for x, y in zip(a if key == "rows" else [a], b if key == "rows" else [b]):
            assert 2 * x["cache_bytes_per_token"] == y["cache_bytes_per_token"]  # bf16 rows: half the bytes
            assert abs(x["ppl"] / y["ppl"] - 1) < 0.05
    demo = run_demo(kv_budget=0.5, model=str(bf16_source), text=str(text), seq_len=32, max_windows=2,
                    out=str(tmp_path / "demo"), progress=False)
    assert demo["dtype"] == "bfloat16" and stored(tmp_path / "demo") == {"BF16"}
