"""The CLI end to end on a tiny local model, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from latentkv.cli import main

from conftest import SAMPLE, make_tiny, run_cli


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("src") / "tiny"
    make_tiny("llama-gqa", layers=3).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    (d.parent / "sample.txt").write_text(SAMPLE * 3)
    return d


run = run_cli


def test_convert_info_eval(capsys, source_dir, tmp_path):
    out = tmp_path / "mla"
    code, stdout, _ = run(capsys, "convert", source_dir, "--out", out, "--kv-budget", 0.5, "--json")
    assert code == 0
    conv = json.loads(stdout)
    assert conv["cache_values_per_token_per_layer"] == 32 and conv["source_values_per_token_per_layer"] == 64
    code, stdout, _ = run(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert info["model"]["bytes_per_token"] * 2 == info["source"]["bytes_per_token"] == 3 * 64 * 4
    code, stdout, _ = run(capsys, "eval", out, "--ppl", source_dir.parent / "sample.txt", "--seq-len", 32, "--json")
    ev = json.loads(stdout)
    assert code == 0 and {"ppl", "nll", "tokens", "windows"} <= ev.keys() and ev["ppl"] > 1


def test_full_budget_cli_matches_source_ppl(capsys, source_dir, tmp_path):
    text = source_dir.parent / "sample.txt"
    assert run(capsys, "convert", source_dir, "--out", tmp_path / "x", "--kv-budget", 1)[0] == 0
    ppl = [json.loads(run(capsys, "eval", m, "--ppl", text, "--seq-len", 32, "--json")[1])["ppl"]
           for m in (source_dir, tmp_path / "x")]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5)


@pytest.mark.parametrize("argv, match", [
    (["convert", "{src}", "--out", "{out}", "--kv-budget", "0"], "--kv-budget must be in (0, 1]"),
    (["convert", "{src}", "--out", "{out}", "--kv-budget", "1.5"], "--kv-budget must be in (0, 1]"),
    (["convert", "{src}", "--out", "{out}", "--kv-lora-rank", "8", "--qk-rope-head-dim", "5"], "must be even"),
    (["convert", "{src}", "--out", "{out}", "--kv-lora-rank", "999", "--qk-rope-head-dim", "8"], "between 1 and"),
    (["convert", "./no-such-model", "--out", "{out}"], "not found"),
    (["eval", "{src}", "--ppl", "/no/such.txt"], "not found"),
    (["info", "{out}"], "not found"),
])
def test_bad_input_is_one_line(capsys, source_dir, tmp_path, argv, match):
    argv = [a.format(src=source_dir, out=tmp_path / "out") for a in argv]
    code, stdout, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept(capsys, source_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "convert", source_dir, "--out", out)
    assert code == 2 and "--overwrite" in err and list(out.iterdir()) == []


def test_console_script_offline_hub_id(tmp_path):
    """An unreachable hub id fails in one line, not a stack trace from the hub client."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    exe = os.path.join(os.path.dirname(sys.executable), "latentkv")
    proc = subprocess.run([exe, "info", "some-org/not-a-model"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: could not load model 'some-org/not-a-model'")
    assert "Traceback" not in proc.stderr


def test_passkey_on_tiny_model(capsys, source_dir):
    code, stdout, err = run(capsys, "eval", source_dir, "--passkey", "--context", "300,400", "--depths", "0,1",
                          "--trials", 2, "--json")
    assert code == 0, err
    res = json.loads(stdout)["passkey"]
    assert code == 0 and len(res["rows"]) == 4 and all(r["trials"] == 2 for r in res["rows"])
    assert 0.0 <= res["accuracy"] <= 1.0
    assert 0.0 <= res["found_accuracy"] <= 1.0 and all(0 <= r["found"] <= r["trials"] for r in res["rows"])
    code, stdout, err = run(capsys, "eval", source_dir, "--passkey", "--context", "300", "--depths", "0",
                            "--trials", 1)
    assert code == 0 and "strict" in stdout and "(number: " in stdout, err


@pytest.mark.parametrize("argv, match", [(["--passkey", "--context", "10"], "too short"),
                                         (["--passkey", "--context", "1e9x"], "comma-separated"),
                                         (["--passkey", "--context", "300", "--depths", "2"], "[0, 1]"),
                                         (["--passkey", "--context", "4096"], "exceeds"), ([], "--suite and/or --tasks")])
def test_passkey_bad_input(capsys, source_dir, argv, match):
    code, _, err = run(capsys, "eval", source_dir, *argv)
    assert code == 2 and match in err


def test_sweep_writes_table_json_and_plot(capsys, source_dir, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", source_dir, "--out", out, "--budgets", "1,0.5", "--methods", "lowrank,svd",
                            "--ppl", source_dir.parent / "sample.txt", "--seq-len", 32, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert [(r["method"], r["budget"]) for r in res["rows"]] == [("exact", 1.0), ("lowrank", 0.5), ("svd", 0.5)]
    assert res["rows"][0]["ppl"] == pytest.approx(res["source"]["ppl"], rel=1e-5)
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.md", "ppl_vs_cache.png", "latent_spectra.png"}
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in ("ppl_vs_cache.png", "latent_spectra.png"))
    low = res["rows"][1]
    # the share left out at the chosen rank is the tail of the per-layer energy spectrum
    for energy, share in zip(low["latent_energy"], low["latent_error_share"]):
        assert sum(energy) == pytest.approx(1, abs=1e-4)
        assert sum(energy[low["kv_lora_rank"]:]) == pytest.approx(share, abs=1e-4)


@pytest.fixture(scope="module")
def converted_dir(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "mla"
    assert main(["convert", str(source_dir), "--out", str(out), "--kv-budget", "0.25", "--method", "svd"]) == 0
    return out


def test_generate_cli(capsys, converted_dir, tmp_path):
    code, stdout, err = run(capsys, "generate", converted_dir, "The quick brown", "--max-new-tokens", 5, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert len(res["tokens"][0]) <= 5 and res["finish"][0] in ("eos", "length") and res["cache_bytes"] > 0
    batch = tmp_path / "prompts.txt"
    batch.write_text("The quick brown\n\nA latent cache\n")
    code, stdout, err = run(capsys, "generate", converted_dir, "--batch-file", batch, "--max-new-tokens", 3)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("The quick brown") and len(stdout.splitlines()) == 2


@pytest.mark.parametrize("argv, match", [(["--batch-file", "nope.txt"], "not found"), ([], "give a prompt"),
                                         (["fox " * 400], "exceeds the model's context")])
def test_generate_bad_input(capsys, converted_dir, tmp_path, argv, match):
    code, _, err = run(capsys, "generate", converted_dir, *argv)
    assert code == 2 and match in err and "Traceback" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    code, _, err = run(capsys, "generate", converted_dir, "--batch-file", empty)
    assert code == 2 and "has no prompts" in err


def test_bench_end_to_end(capsys, converted_dir, source_dir, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = run(capsys, "bench", converted_dir, "--against", source_dir, "--context", "16,600",
                            "--batch", "1,2", "--new-tokens", 3, "--out", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    done = [r for r in res["rows"] if "skipped" not in r]
    assert {r["variant"] for r in done} == {"source", "source-static", "latent-expanded", "latent-absorbed"}
    for r in done:
        assert {"variant", "context", "batch", "decode_tokens_per_s", "prefill_s", "cache_bytes",
                "peak_rss_bytes"} <= set(r)
        assert r["cache_bytes"] == r["cache_bytes_formula"] and r["decode_tokens_per_s"] > 0
        assert r["compute_floor_s"] > 0 and r["roofline_fraction"] >= r["floor_fraction"] > 0
    latent = {r["cache_bytes"] for r in done if r["variant"].startswith("latent") and r["batch"] == 2
              and r["context"] == 16}
    source = [r["cache_bytes"] for r in done if r["variant"] == "source" and r["batch"] == 2 and r["context"] == 16]
    static = [r["cache_bytes"] for r in done if r["variant"] == "source-static" and r["batch"] == 2 and r["context"] == 16]
    assert static == source  # both hold context + new tokens of K/V for both sequences
    assert len(latent) == 1 and latent.pop() * 4 == source[0]  # 25 % budget
    assert all("exceeds the model's 512 positions" in r["skipped"] for r in res["rows"] if r["context"] == 600)
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG" and (out / "bench.json").is_file()
    code, _, err = run(capsys, "bench", converted_dir, "--context", "600", "--batch", "1", "--out", tmp_path / "b2")
    assert code == 2 and "no row of the grid fits" in err


def test_generate_ctrl_c_is_one_line(capsys, converted_dir, monkeypatch):
    import latentkv.cli.commands

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(latentkv.cli.commands, "generate", interrupted)
    code, _, err = run(capsys, "generate", converted_dir, "The quick")
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_convert_export_verify_load(capsys, source_dir, tmp_path):
    """convert --target deepseek_v3 -> export -> verify-export (stock transformers) -> load back."""
    conv, ds = tmp_path / "mla", tmp_path / "ds"
    code, _, err = run(capsys, "convert", source_dir, "--out", conv, "--kv-budget", "0.5", "--target", "deepseek_v3",
                       "--calib", source_dir.parent / "sample.txt", "--calib-samples", 4, "--calib-seq-len", 32)
    assert code == 0, err
    assert "fast MLA kernels" in err  # tiny ranks are not 512+64: warned, not refused
    code, _, err = run(capsys, "export", conv, "--out", ds)
    assert code == 0, err
    code, stdout, err = run(capsys, "verify-export", ds, "--against", conv, "--json", "--tokens", 48)
    res = json.loads(stdout)
    assert code == 0 and res["passed"], res
    assert res["max_abs_diff"] <= 1e-4 and res["greedy_agreement"] == 1.0 and res["generation_match"]
    assert res["cache_bytes_per_token"] == res["expected_cache_bytes_per_token"]
    code, stdout, err = run(capsys, "load", ds, "--json", "--out", tmp_path / "native")
    assert code == 0, err
    assert json.loads(stdout)["model"]["bytes_per_token"] == res["cache_bytes_per_token"]
    code, stdout, _ = run(capsys, "generate", tmp_path / "native", "The quick", "--max-new-tokens", 3, "--json")
    assert code == 0 and len(json.loads(stdout)["tokens"][0]) == 3
    # an export whose latent up-projection is off by 1 % fails (exit 1), on its logits
    from safetensors.torch import load_file, save_file

    shard = next(ds.glob("*.safetensors"))
    weights = load_file(shard)
    key = next(k for k in weights if k.endswith("kv_b_proj.weight"))
    weights[key] = weights[key] * 1.01
    save_file(weights, shard, metadata={"format": "pt"})
    code, stdout, _ = run(capsys, "verify-export", ds, "--against", conv, "--json", "--tokens", 48)
    res = json.loads(stdout)
    assert code == 1 and not res["passed"] and res["max_abs_diff"] > 1e-3


@pytest.mark.parametrize("argv,match", [
    (["export", "{conv}", "--out", "{tmp}/ds"], "latent norm"),
    (["verify-export", "{tmp}/nothing", "--against", "{conv}"], "not found"),
    (["verify-export", "{conv}", "--against", "{conv}"], "not an export"),
])
def test_export_bad_input_is_one_line(capsys, converted_dir, tmp_path, argv, match):
    code, _, err = run(capsys, *[a.format(conv=converted_dir, tmp=tmp_path) for a in argv])
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_doctor_reports_and_fails_on_full_disk(capsys, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    code, stdout, _ = run(capsys, "doctor", tmp_path, "--json")
    res = json.loads(stdout)
    names = {c["name"]: c for c in res["checks"]}
    assert code == 0 and res["ok"] and names["torch"]["status"] == "ok" and "transformers" in names
    assert all(c["status"] in ("ok", "warn", "fail") for c in res["checks"])
    from latentkv.io.machine import native_bf16  # what heal's --precision auto will pick, said up front

    assert names["bf16 matmul"]["status"] == ("ok" if native_bf16() else "warn")
    from latentkv.io import domains  # the docs calibration text: which listed packages are missing, and the fix

    assert names["docs calibration text"]["status"] == ("warn" if domains.package_docs_missing() else "ok")
    monkeypatch.setattr(domains, "package_docs_missing", lambda: ["rich", "tqdm"])
    code, stdout, _ = run(capsys, "doctor", tmp_path)
    assert code == 0 and "2 of" in stdout and "rich, tqdm" in stdout and "latentkv[test]" in stdout
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    code, stdout, _ = run(capsys, "doctor", tmp_path)
    assert code == 1 and "FAIL" in stdout and "free some space" in stdout and "not ready" in stdout


def test_eval_copy_probe_and_suite(capsys, source_dir):
    code, out, err = run(capsys, "eval", source_dir, "--copy", "--copy-lengths", "16,32", "--copy-distances", "0,8",
                         "--json")
    assert code == 0, err
    copy = json.loads(out)["copy"]
    assert [(r["length"], r["distance"]) for r in copy["rows"]] == [(16, 0), (16, 8), (32, 0), (32, 8)]
    code, out, _ = run(capsys, "eval", source_dir, "--copy", "--copy-lengths", "16", "--copy-distances", "0")
    assert code == 0 and "copy probe accuracy" in out and "length    16" in out
    code, out, err = run(capsys, "eval", source_dir, "--suite", "--seq-len", "64", "--max-windows", "1", "--json")
    assert code == 0, err
    suite = json.loads(out)["suite"]
    assert set(suite["domains"]) == {"wikitext2", "ptb", "fiction", "code", "docs"}
    assert all(d["windows"] == 1 and d["ppl"] > 1 for d in suite["domains"].values()) and "copy" in suite


def test_localize_marks_layers_and_the_output_keeps_them(converted_dir, tmp_path, capsys):
    """`localize --layers` and `--count` (the retrieval probe picks): the saved model reloads with those layers
    local, its cache stops growing there, and the bytes it reports at long contexts shrink."""
    from latentkv import LatentCache, load

    out = tmp_path / "local"
    assert main(["localize", str(converted_dir), "--layers", "0,2", "--sinks", "2", "--window", "8", "--out", str(out),
                 "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["local_layers"] == [0, 2] and result["probe"] is None
    assert all(b["local"] < b["full"] < b["source"] for b in result["bytes"].values())
    model, _ = load(out)
    assert [layer.self_attn.local is not None for layer in model.model.layers] == [True, False, True]
    cache = LatentCache(model)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 40)), cache=cache, use_cache=True)
    assert cache.layers[0].c_kv.shape[2] == 2 + 8 - 1 and cache.layers[1].c_kv.shape[2] == 40
    out2 = tmp_path / "probed"
    assert main(["localize", str(converted_dir), "--count", "1", "--probe-context", "200", "--out", str(out2),
                 "--json", "-q"]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert len(probed["local_layers"]) == 1 and len(probed["probe"]["scores"]) == 3
    assert probed["local_layers"][0] == min(range(3), key=lambda i: probed["probe"]["scores"][i])


def test_localize_refusals(converted_dir, source_dir, tmp_path, capsys):
    assert main(["localize", str(converted_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--count K" in capsys.readouterr().err
    assert main(["localize", str(converted_dir), "--count", "9", "--out", str(tmp_path / "x")]) == 2
    assert "has 3 layers" in capsys.readouterr().err
    assert main(["localize", str(source_dir), "--layers", "0", "--out", str(tmp_path / "x")]) == 2
    assert "converted by latentkv" in capsys.readouterr().err
