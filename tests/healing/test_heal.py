"""Healing: losses, data packing, local and end-to-end distillation, resume, DDP, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentkv.cli import main
from latentkv.errors import LatentKVError
from latentkv.healing.data import WindowOrder, pack
from latentkv.healing.losses import kl_full, kl_topk, teacher_topk
from latentkv.healing.run import HealConfig, heal
from latentkv.loading import load_model
from latentkv.runtime.checkpoint import load

from conftest import SAMPLE, VOCAB, make_tiny

CLI = [sys.executable, "-m", "latentkv"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    """A tiny GQA source, its 25 % conversion, an exact (full-rank) conversion and training text."""
    root = tmp_path_factory.mktemp("heal")
    src = root / "src"
    model = make_tiny("llama-gqa", layers=3)
    with torch.no_grad():  # peaked next-token distributions and attention, so the KL has something to fit
        model.lm_head.weight.mul_(25)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
            layer.self_attn.v_proj.weight.mul_(4)
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    (root / "data").mkdir()
    words = SAMPLE.split()
    for k in range(3):  # a folder of .txt documents, each a different shuffle of the sample's words
        g = torch.Generator().manual_seed(k)
        (root / "data" / f"doc{k}.txt").write_text(" ".join(words[i] for i in torch.randperm(len(words), generator=g)) * 6)
    for name, extra in (("low", ["--kv-budget", "0.25", "--method", "svd"]), ("exact", ["--method", "exact"])):
        assert main(["convert", str(src), "--out", str(root / name), *extra]) == 0
    return root


def small(**kw) -> HealConfig:
    # float32: these tests compare runs to 1e-6 (auto picks bf16 autocast on a bf16 CPU)
    base = dict(tokens=16 * 32, seq_len=16, batch_size=4, lr=3e-3, save_every=2, warmup_ratio=0.0, precision="fp32")
    return HealConfig(**{**base, **kw})


def teacher_kl(student_dir, dirs, tok) -> float:
    student, _ = load_model(student_dir, progress=False)
    teacher, _ = load_teacher(dirs)
    ids = torch.tensor(tok(SAMPLE)["input_ids"][:64])[None]
    with torch.no_grad():
        return float(kl_full(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def load_teacher(dirs):
    from latentkv.loading import load_model

    return load_model(dirs / "src", progress=False)


def state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_kl_losses():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    assert float(kl_full(t, t)) == pytest.approx(0, abs=1e-6)
    ref = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert float(kl_full(s, t)) == pytest.approx(float(ref), rel=1e-5)
    assert float(kl_topk(s, *teacher_topk(t, 50))) == pytest.approx(float(ref), rel=1e-4)  # k = V: exact
    coarse = float(kl_topk(s, *teacher_topk(t, 8)))
    assert 0 < coarse < float(ref)  # coarsening to k + 1 bins lowers a KL
    assert float(kl_full(s, t, temperature=2.0)) != pytest.approx(float(ref), rel=1e-3)


def test_pack_and_order(tiny_tokenizer):
    w = pack(tiny_tokenizer, ["one two three " * 20, "", "four five " * 20], 8)
    flat = w.flatten().tolist()
    assert w.shape[1] == 8 and flat.count(tiny_tokenizer.eos_token_id) >= 1
    with pytest.raises(LatentKVError, match="empty or shorter"):
        pack(tiny_tokenizer, ["  "], 8)
    order = WindowOrder(5, seed=3)
    first = order.take(0, 5).tolist()
    assert sorted(first) == list(range(5))  # one epoch visits every window once
    assert order.take(2, 6).tolist() == WindowOrder(5, seed=3).take(2, 6).tolist()  # resumable by position
    assert sorted(order.take(5, 5).tolist()) == list(range(5)) and order.take(5, 5).tolist() != first


def test_exact_student_starts_at_zero_kl(dirs, tmp_path):
    report = heal(dirs / "exact", dirs / "src", dirs / "data", tmp_path / "o", small(tokens=16 * 8), progress=False)
    assert report["first_loss"] < 1e-5  # a full-rank conversion is the teacher: the targets line up


def test_heal_lowers_kl_and_writes_log(dirs, tmp_path, tiny_tokenizer):
    out = tmp_path / "healed"
    report = heal(dirs / "low", dirs / "src", dirs / "data", out, small(), progress=False)
    assert report["steps"] == 8 and report["tokens"] == 8 * 4 * 16
    assert teacher_kl(out, dirs, tiny_tokenizer) < 0.7 * teacher_kl(dirs / "low", dirs, tiny_tokenizer)
    rows = [json.loads(r) for r in (out / "heal_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and (out / "heal_loss.png").stat().st_size > 0
    assert load(out)[0].config.latentkv["heal"]["steps"] == 8
    assert not Path(str(out) + ".heal").exists()  # checkpoints go once the output is whole
    changed = {k for k, v in state(out).items() if not torch.equal(v, state(dirs / "low")[k])}
    assert changed and all(".self_attn." in k for k in changed)  # default: attention weights only


def test_bf16_autocast_heals_and_keeps_float32_weights(dirs, tmp_path, tiny_tokenizer):
    out = tmp_path / "bf16"
    report = heal(dirs / "low", dirs / "src", dirs / "data", out, small(precision="bf16"), progress=False)
    assert report["precision"] == "bf16"
    assert teacher_kl(out, dirs, tiny_tokenizer) < 0.7 * teacher_kl(dirs / "low", dirs, tiny_tokenizer)
    assert {v.dtype for v in state(out).values() if v.is_floating_point()} == {torch.float32}  # weights stay fp32


def test_precision_auto_follows_the_hardware(tmp_path, monkeypatch):
    from latentkv.healing import run
    from latentkv.io.machine import native_bf16

    for flags, native in (("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                          ("fpu avx2 avx512f avx512bw", False)):
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        assert native_bf16("cpu", tmp_path / "cpuinfo") is native
    assert native_bf16("cpu", tmp_path / "missing") is False
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(run, "native_bf16", lambda device, native=native: native)
        assert run.resolve_precision("auto", "cpu") == want and run.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.warns(UserWarning, match="no native bf16"):
        assert run.resolve_precision("bf16", "cpu") == "bf16"


def test_tensorboard_tracker_gets_every_step_and_lands_in_the_output(dirs, tmp_path):
    """--report-to tensorboard (offline): the same rows as log.jsonl, in OUT/trackers; unknown is one line."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    heal(dirs / "low", dirs / "src", dirs / "data", out, small(tokens=16 * 12), progress=False, report_to="tensorboard")
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [json.loads(r) for r in (out / "heal_log.jsonl").read_text().splitlines()]
    scalars = acc.Scalars("loss")
    assert [e.step for e in scalars] == [r["step"] for r in logged]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-5)
    with pytest.raises(LatentKVError, match="unknown --report-to 'mlflow'"):
        heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "x", small(), progress=False, report_to="mlflow")


def test_gqa_target_heals_and_stays_a_stock_checkpoint(dirs, tmp_path, tiny_tokenizer):
    """A `convert --target gqa` result (a stock checkpoint, no latentkv record) heals like a conversion and
    is written back as a stock checkpoint that AutoModelForCausalLM loads, with heal.json beside it."""
    from transformers import AutoModelForCausalLM

    gqa = tmp_path / "gqa"
    assert main(["convert", str(dirs / "src"), "--target", "gqa", "--kv-heads", "1", "--out", str(gqa),
                 "--calib", str(dirs / "data" / "doc0.txt"), "--calib-samples", "4", "--calib-seq-len", "16"]) == 0
    out = tmp_path / "gqa-healed"
    report = heal(gqa, dirs / "src", dirs / "data", out, small(), progress=False)
    assert report["steps"] == 8 and json.loads((out / "heal.json").read_text())["steps"] == 8
    healed = AutoModelForCausalLM.from_pretrained(out)
    assert healed.config.num_key_value_heads == 1 and (out / "heal_loss.png").is_file()
    before = AutoModelForCausalLM.from_pretrained(gqa)
    assert teacher_kl(out, dirs, tiny_tokenizer) < teacher_kl(gqa, dirs, tiny_tokenizer)
    changed = [k for k, v in healed.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(".self_attn." in k for k in changed)


def test_lora_merges_and_all_trains_everything(dirs, tmp_path, tiny_tokenizer):
    heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "lora", small(train="lora", lora_rank=4), progress=False)
    st = state(tmp_path / "lora")
    assert not any("lora" in k for k in st) and set(st) == set(state(dirs / "low"))
    assert teacher_kl(tmp_path / "lora", dirs, tiny_tokenizer) < teacher_kl(dirs / "low", dirs, tiny_tokenizer)
    heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "all", small(train="all", tokens=16 * 8), progress=False)
    assert not torch.equal(state(tmp_path / "all")["model.layers.0.mlp.up_proj.weight"],
                           state(dirs / "low")["model.layers.0.mlp.up_proj.weight"])


def test_local_stage_lowers_every_layer_error(dirs, tmp_path):
    report = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "loc",
                  small(tokens=0, local_steps=60, local_windows=4), progress=False)
    layers = report["local"]["layers"]
    assert len(layers) == 3 and all(r["after"] <= r["before"] for r in layers)
    assert sum(r["after"] for r in layers) < 0.8 * sum(r["before"] for r in layers)
    exact = heal(dirs / "exact", dirs / "src", dirs / "data", tmp_path / "ex", small(tokens=0, local_steps=2),
                 progress=False)
    assert max(r["before"] for r in exact["local"]["layers"]) < 1e-8  # full rank: nothing to fit


def test_teacher_cache_reuse_matches_and_refuses_other_settings(dirs, tmp_path):
    cache = tmp_path / "tcache"
    cfg = small(tokens=16 * 16, teacher_topk=VOCAB)  # k = V: the cached loss is the full KL
    a = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "a", cfg, teacher_cache=cache, progress=False)
    assert len(list(cache.glob("w*.safetensors"))) > 0
    b = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "b", cfg, teacher_cache=cache, progress=False)
    full = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "c", cfg, progress=False)
    assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-6)
    assert a["last_loss"] == pytest.approx(full["last_loss"], rel=1e-3)
    with pytest.raises(LatentKVError, match="other settings"):
        heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "d", small(teacher_topk=8), teacher_cache=cache,
             progress=False)


def cli_heal(dirs, out, *extra, env=None, popen=False):
    argv = [*CLI, "heal", str(dirs / "low"), "--teacher", str(dirs / "src"), "--data", str(dirs / "data"),
            "--out", str(out), "--seq-len", "16", "--batch-size", "4", "--lr", "3e-3", "--precision", "fp32", "--json",
            *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def test_resume_after_kill9_matches_uninterrupted(dirs, tmp_path):
    steps, every = 120, 10
    ref = cli_heal(dirs, tmp_path / "ref", "--tokens", steps * 64, "--save-every", every)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out, work = tmp_path / "killed", tmp_path / "killed.heal"
    proc = cli_heal(dirs, out, "--tokens", steps * 64, "--save-every", every, popen=True)
    deadline = time.time() + 300
    while not list(work.glob("ckpt-*/progress.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # kill somewhere inside a later interval
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists(), "the run finished before the kill; make it longer"
    logged = max(json.loads(r)["step"] for r in (work / "log.jsonl").read_text().splitlines())
    saved = max(json.loads((p / "progress.json").read_text())["step"] for p in work.glob("ckpt-*"))
    assert logged - saved <= every  # at most one interval is lost
    again = cli_heal(dirs, out, "--tokens", steps * 64, "--save-every", every, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["resumed_at_step"] == saved
    a, b = state(tmp_path / "ref"), state(out)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


FSDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 1
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_use_orig_params: true
  fsdp_sync_module_states: false
  fsdp_cpu_ram_efficient_loading: false
"""


@pytest.fixture(scope="module")
def one_process(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    one = cli_heal(dirs, out, "--tokens", 8 * 64, "--save-every", 4)
    assert one.returncode == 0, one.stderr[-2000:]
    return out


@pytest.mark.parametrize("launcher", ["torchrun-ddp", "accelerate-fsdp"])
def test_two_processes_match_one(dirs, tmp_path, one_process, launcher):
    """Two gloo CPU processes, same global batch (4 windows: 2 per process, accumulated 2 vs 4
    micro-steps) -> the same weights as one process, up to float summation order."""
    if launcher == "torchrun-ddp":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    else:
        (tmp_path / "fsdp.yaml").write_text(FSDP_CPU)
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
                "--main_process_port", "29518"]
    argv = [*head, "-m", "latentkv", "heal", str(dirs / "low"), "--teacher", str(dirs / "src"), "--data",
            str(dirs / "data"), "--out", str(tmp_path / "two"), "--seq-len", "16", "--batch-size", "4",
            "--lr", "3e-3", "--tokens", str(8 * 64), "--save-every", "4", "--precision", "fp32", "--json"]
    two = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    printed = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["processes"] == 2  # only rank 0 prints
    a, b, base = state(one_process), state(tmp_path / "two"), state(dirs / "low")
    assert set(a) == set(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    assert moved > 1e-3 and diff < 1e-3 * moved, (diff, moved)


def test_two_processes_stream_their_own_shards(dirs, tmp_path):
    """`hf:` data under two processes: each packs its own shard; the run trains and saves as usual."""
    ds = tmp_path / "ds"
    ds.mkdir()
    words = (dirs / "data" / "doc0.txt").read_text().split()
    (ds / "train.txt").write_text("\n".join(" ".join(words[i: i + 40]) for i in range(0, len(words) - 40, 7)))
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
            "-m", "latentkv", "heal", str(dirs / "low"), "--teacher", str(dirs / "src"), "--data", f"hf:{ds}:train",
            "--out", str(tmp_path / "two"), "--seq-len", "16", "--batch-size", "4", "--tokens", str(4 * 64), "--json"]
    two = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads([line for line in two.stdout.splitlines() if line.startswith("{")][0])
    assert report["processes"] == 2 and report["steps"] == 4
    assert any(not torch.equal(v, state(dirs / "low")[k]) for k, v in state(tmp_path / "two").items())


def fail_save_state(monkeypatch, on_call: int):
    """accelerate's save_state fails with a full disk on its `on_call`-th call -> a function that restores it."""
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def flaky(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == on_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, *a, **kw)

    monkeypatch.setattr(Accelerator, "save_state", flaky)
    return lambda: monkeypatch.setattr(Accelerator, "save_state", real)


def test_checkpoint_disk_full_keeps_previous(dirs, tmp_path, monkeypatch):
    restore = fail_save_state(monkeypatch, on_call=2)
    out = tmp_path / "o"
    with pytest.raises(LatentKVError, match=r"No space left.*ckpt-00000002\) is intact.*--resume"):
        heal(dirs / "low", dirs / "src", dirs / "data", out, small(), progress=False)
    work = Path(str(out) + ".heal")
    assert [p.name for p in work.glob("ckpt-*")] == ["ckpt-00000002"] and not (work / ".ckpt-tmp").exists()
    restore()
    report = heal(dirs / "low", dirs / "src", dirs / "data", out, small(), resume=True, progress=False)
    assert report["resumed_at_step"] == 2 and out.is_dir()


def test_bad_input_is_one_line(dirs, tmp_path, capsys, tiny_tokenizer):
    def run(*argv):
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err

    base = ["heal", dirs / "low", "--teacher", dirs / "src", "--out", tmp_path / "o", "--seq-len", 16,
            "--batch-size", 4]
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("  \n")
    other = tmp_path / "other"
    m = make_tiny("llama-gqa", layers=1)
    m.resize_token_embeddings(VOCAB + 8)
    m.save_pretrained(other)
    cases_tok = [(["heal", dirs / "low", "--teacher", other, "--data", dirs / "data", "--out", tmp_path / "o"],
                  "could not load the tokenizer")]
    for argv, match in cases_tok:
        assert main([str(a) for a in argv]) == 2 and match in capsys.readouterr().err
    tiny_tokenizer.save_pretrained(other)
    renamed = tmp_path / "renamed"  # the teacher's weights and vocab size, other tokens
    load_teacher(dirs)[0].save_pretrained(renamed)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["zebra quartz yodel " * 50], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>").save_pretrained(renamed)
    capsys.readouterr()
    cases = [([*base, "--data", tmp_path / "empty"], "holds no .txt"),
             ([*base, "--data", tmp_path / "blank.txt"], "empty or shorter"),
             ([*base, "--data", dirs / "data", "--tokens", 10], "smaller than one batch"),
             ([*base, "--data", dirs / "data", "--batch-size", 3, "--micro-batch", 2], "not a multiple"),
             (["heal", dirs / "low", "--teacher", other, "--data", dirs / "data", "--out", tmp_path / "o"],
              "vocabularies differ"),
             (["heal", dirs / "low", "--teacher", renamed, "--data", dirs / "data", "--out", tmp_path / "o"],
              "tokenizers differ"),
             (["heal", dirs / "src", "--teacher", dirs / "src", "--data", dirs / "data", "--out", tmp_path / "o"],
              "not a latentkv conversion"),
             ([*base, "--data", dirs / "nope"], "not found")]
    for argv, match in cases:
        code, err = run(*argv)
        last = err.strip().splitlines()[-1]  # before it, at most the loaders' progress bars
        assert code == 2 and last.startswith("error: ") and match in last and "Traceback" not in err, (argv, err)
    (tmp_path / "exists").mkdir()
    code, err = run("heal", dirs / "low", "--teacher", dirs / "src", "--data", dirs / "data", "--out",
                    tmp_path / "exists")
    assert code == 2 and "--overwrite" in err


def test_healed_export_grade_model_keeps_layout_exports_and_verifies(dirs, tmp_path):
    """Healing the deployable form: the rope schedule and shared rope key stay as converted, the latent
    norm (`kv_a_layernorm`) trains with the rest of attention, and the healed model exports and verifies."""
    from latentkv.reports.verify import verify_export

    conv, healed, ds = tmp_path / "target", tmp_path / "healed", tmp_path / "ds"
    assert main(["convert", str(dirs / "src"), "--out", str(conv), "--kv-budget", "0.5", "--target", "deepseek_v3",
                 "--calib", str(dirs / "data" / "doc0.txt"), "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    heal(conv, dirs / "src", dirs / "data", healed, small(), progress=False)
    (before, rec_b), (after, rec_a) = ((m, m.config.latentkv) for m, _ in (load(conv), load(healed)))
    for a, b in zip(after.model.layers, before.model.layers):
        assert torch.equal(a.self_attn.rope_freq_idx, b.self_attn.rope_freq_idx)
        assert a.self_attn.kv_a_layernorm is not None
        assert not torch.equal(a.self_attn.kv_a_layernorm.weight, b.self_attn.kv_a_layernorm.weight)
    assert rec_a["layers"] == rec_b["layers"] and rec_a["split_search"] == rec_b["split_search"]
    assert main(["export", str(healed), "--out", str(ds)]) == 0
    res = verify_export(ds, healed, tokens=48, progress=False)
    assert res["passed"] and res["max_abs_diff"] <= 1e-4 and res["generation_match"], res


def test_qk_norm_student_heals(tmp_path, tiny_tokenizer, dirs):
    """A Qwen3 (QK-norm per KV head) conversion heals like any other: the source query and key projections
    train with the rest of the attention, the KL to the teacher falls, the healed model loads."""
    src = tmp_path / "q3"
    model = make_tiny("qwen3-qknorm", layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["convert", str(src), "--out", str(tmp_path / "low"), "--kv-budget", "0.25", "--method", "svd"]) == 0
    heal(tmp_path / "low", src, dirs / "data", tmp_path / "healed", small(), progress=False)
    teacher = load_model(src, progress=False)[0]
    ids = torch.tensor(tiny_tokenizer(SAMPLE)["input_ids"][:64])[None]

    def kl(path) -> float:
        with torch.no_grad():
            return float(kl_full(load(path)[0](input_ids=ids).logits, teacher(input_ids=ids).logits))
    assert kl(tmp_path / "healed") < 0.8 * kl(tmp_path / "low")
    changed = {k for k, v in state(tmp_path / "healed").items() if not torch.equal(v, state(tmp_path / "low")[k])}
    assert any("q_src_proj" in k for k in changed) and any("k_src_proj" in k for k in changed)
    assert load(tmp_path / "healed")[0].model.layers[0].self_attn.dims.key_scales == 2


def test_rest_lr_ratio_scales_only_the_weights_outside_attention(dirs, tmp_path):
    # one optimizer step: Adam's first update is lr * g / |g| per element, so it is proportional to each group's lr
    def moved(out, ratio):
        heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / out,
             small(train="all", tokens=16 * 4, rest_lr_ratio=ratio), progress=False)
        before, after = state(dirs / "low"), state(tmp_path / out)
        return {k: after[k] - before[k] for k in before}

    full, half = moved("r1", 1.0), moved("r05", 0.5)
    mlp, attn = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"
    assert full[mlp].abs().max() > 1e-4 and full[attn].abs().max() > 1e-4
    torch.testing.assert_close(half[mlp], 0.5 * full[mlp], atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(half[attn], full[attn], atol=1e-6, rtol=1e-3)
    with pytest.raises(LatentKVError, match="--rest-lr-ratio"):
        small(train="attention", rest_lr_ratio=0.5)


def test_average_last_saves_the_mean_of_the_last_steps_and_resumes_it(dirs, tmp_path, monkeypatch):
    # a constant lr, so a 3-step run is the first 3 steps of a 4-step one; the mean over the last half of
    # 4 steps is then the mean of those two runs' weights
    const = dict(tokens=16 * 4 * 4, min_lr_ratio=1.0, save_every=1)

    def run(out, resume=False, **kw):
        return heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / out, small(**{**const, **kw}),
                    resume=resume, progress=False)

    run("three", tokens=16 * 4 * 3)
    run("four")
    report = run("avg", average_last=0.5)
    assert report["averaged_steps"] == 2
    three, four, avg = state(tmp_path / "three"), state(tmp_path / "four"), state(tmp_path / "avg")
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    assert (four[key] - three[key]).abs().max() > 1e-4  # the steps moved the weights
    for k in avg:  # integer buffers (rope indices) are not trained
        want = (three[k] + four[k]) / 2 if avg[k].is_floating_point() else four[k]
        torch.testing.assert_close(avg[k], want, atol=1e-6, rtol=1e-5)

    # stopped after its third step (the third checkpoint fails), resumed: the mean carries over exactly
    restore = fail_save_state(monkeypatch, on_call=3)
    with pytest.raises(LatentKVError, match="--resume"):
        run("resumed", average_last=0.75)
    restore()
    assert (tmp_path / "resumed.heal" / "ckpt-00000002" / "average-0.safetensors").is_file()
    report = run("resumed", resume=True, average_last=0.75)
    assert report["resumed_at_step"] == 2 and report["averaged_steps"] == 3
    whole = run("whole", average_last=0.75)
    assert whole["averaged_steps"] == 3
    resumed, whole = state(tmp_path / "resumed"), state(tmp_path / "whole")
    assert all(torch.allclose(resumed[k], whole[k], rtol=0, atol=1e-6) for k in whole)
    with pytest.raises(LatentKVError, match="--average-last"):
        small(average_last=1.5)
