"""DeepSeek-V3 export: stock transformers == our runtime, import back, the latent norm, refusals."""

import dataclasses
import json

import pytest
import torch

from latentkv import LatentKVError, LowRankConfig, convert
from latentkv.conversion.configs import make_config
from latentkv.deepseek.export import export
from latentkv.deepseek.layout import interleave_order, query_fold
from latentkv.deepseek.reader import load_engine_checkpoint
from latentkv.reports.verify import load_stock

from conftest import make_tiny

EXPORTABLE = ["llama-gqa", "llama-mha", "llama-mqa", "llama3-rope", "mistral-gqa", "phi3-fused", "qwen2-bias"]


def calib():
    torch.manual_seed(3)
    return torch.randint(0, 320, (8, 64))


def target_model(name: str, budget: float = 0.5, tie: bool = False):
    """A tiny source with logits of a realistic size (lm_head scaled), converted for DeepSeek-V3."""
    model = make_tiny(name)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.config.tie_word_embeddings = tie
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return convert(model, make_config(kv_budget=budget, target="deepseek_v3"), calib_ids=calib(), progress=False)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_stock_transformers_matches_runtime(name, ids, tmp_path):
    conv = target_model(name)
    export(conv, tmp_path / "ds")
    cfg = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in cfg
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and cfg["num_key_value_heads"] == 4
    assert cfg["q_lora_rank"] is None and cfg["rope_interleave"] and cfg["latentkv"]["conversion"]["latent_norm"]
    stock = load_stock(tmp_path / "ds")
    with torch.no_grad():
        ref = conv(ids).logits
        got = stock(ids).logits
    assert ref.abs().max() > 1  # logits of a real size, so 1e-4 is a real bound
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-rope"])
def test_import_back_all_paths(name, ids, tmp_path):
    """Export -> our loader: same logits on both paths, same cached greedy decode."""
    conv = target_model(name, tie=True)
    export(conv, tmp_path / "ds")
    back, _ = load_engine_checkpoint(tmp_path / "ds")
    assert back.config.latentkv["layers"][0]["latent_norm"]
    with torch.no_grad():
        ref = conv(ids).logits
        for path in ("expanded", "absorbed"):
            assert (back(ids, mla_path=path).logits - ref).abs().max().item() <= 1e-4, path
    from latentkv import LatentCache

    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(back.generate(ids[:1], cache=LatentCache(back), **kw), conv.generate(ids[:1], **kw))


def test_interleave_order_sorts_pairs():
    # pairs k = rows (k, k+m); frequencies (2, 0, 1) -> pair order 1, 2, 0
    assert interleave_order(torch.tensor([2, 0, 1])).tolist() == [1, 4, 2, 5, 0, 3]


def test_latent_norm_fit_beats_plain_norm(ids):
    """The fitted norm stays close to the model without it, much closer than a norm dropped in."""
    model = make_tiny("llama-gqa")
    plain_cfg = LowRankConfig(kv_budget=0.5, rope="rorope-export")
    conv = convert(model, plain_cfg, calib_ids=calib(), progress=False)
    normed = convert(model, dataclasses.replace(plain_cfg, latent_norm=True), calib_ids=calib(), progress=False)
    naive = convert(model, plain_cfg, calib_ids=calib(), progress=False)
    from latentkv.runtime.install import install_layer

    x = torch.randn(256, 64) * 0.08
    for layer in naive.model.layers:  # the norm with weight = the mean latent rms, nothing refit
        attn = layer.self_attn
        dims = dataclasses.replace(attn.dims, latent_norm=True, rms_norm_eps=1e-6)
        with torch.no_grad():
            scale = attn.kv_a_proj_with_mqa(x)[:, : dims.kv_lora_rank].pow(2).mean().sqrt()
        state = {**attn.state_dict(), "kv_a_layernorm.weight": scale * torch.ones(dims.kv_lora_rank)}
        install_layer(naive, attn.layer_idx, dims, state)
    with torch.no_grad():
        ref, fit, bad = conv(ids).logits, normed(ids).logits, naive(ids).logits
    err_fit, err_bad = (fit - ref).norm() / ref.norm(), (bad - ref).norm() / ref.norm()
    assert err_fit < err_bad
    for layer in normed.model.layers:
        attn = layer.self_attn
        assert attn.dims.latent_norm and torch.equal(attn.kv_a_layernorm.weight, torch.ones(attn.dims.kv_lora_rank))
        assert attn.kv_a_proj_with_mqa.bias is None  # bias-free latent, as engines need


def test_latent_norm_carrier_pins_the_rms():
    """On inputs with a mean (as LLM hidden states have), the carrier slot makes the norm nearly a
    constant scale: the refit kv_b reproduces the un-normed outputs far better than a plain norm."""
    from latentkv.conversion.latent_norm import fit_layer

    conv = convert(make_tiny("llama-gqa"), LowRankConfig(kv_budget=0.5, rope="rorope-export"), calib_ids=calib(),
                   progress=False)
    attn = conv.model.layers[0].self_attn
    torch.manual_seed(0)
    # (tokens, D): a shared mean plus token parts of very different sizes, so rms(latent) spreads widely
    x = torch.randn(64) + torch.randn(4096, 64) * torch.empty(4096, 1).uniform_(0.1, 2)
    r = attn.dims.kv_lora_rank
    with torch.no_grad():
        c = attn.kv_a_proj_with_mqa(x)[:, :r]
        plain = c / c.pow(2).mean(-1, keepdim=True).sqrt() * c.pow(2).mean().sqrt()
        plain_err = ((plain - c) @ attn.kv_b_proj.weight.T).pow(2).mean() / (c @ attn.kv_b_proj.weight.T).pow(2).mean()
        state, fit = fit_layer(attn, x)
    assert fit["carrier_slot"] is not None and fit["kv_b_relative_error"] < 0.5 * float(plain_err)
    assert state["kv_a_layernorm.weight"].eq(1).all()


def test_latent_norm_on_both_paths(ids):
    conv = target_model("llama-gqa")
    with torch.no_grad():
        a, b = conv(ids, mla_path="expanded").logits, conv(ids, mla_path="absorbed").logits
    assert (a - b).abs().max().item() <= 1e-4


def test_sharded_export_loads(ids, tmp_path):
    conv = target_model("llama-gqa")
    export(conv, tmp_path / "ds", max_shard_size="100KB")
    assert (tmp_path / "ds" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert (load_stock(tmp_path / "ds")(ids).logits - conv(ids).logits).abs().max().item() <= 1e-4


def _per_layer_ranks(conv):
    from latentkv.runtime.install import install_layer

    attn = conv.model.layers[1].self_attn
    dims = dataclasses.replace(attn.dims, kv_lora_rank=attn.dims.kv_lora_rank - 1)
    sd = {k: v for k, v in attn.state_dict().items()}
    r = dims.kv_lora_rank
    sd["kv_a_proj_with_mqa.weight"] = torch.cat((sd["kv_a_proj_with_mqa.weight"][:r], sd["kv_a_proj_with_mqa.weight"][r + 1:]))
    sd["kv_b_proj.weight"] = sd["kv_b_proj.weight"][:, :r]
    sd["kv_a_layernorm.weight"] = sd["kv_a_layernorm.weight"][:r]
    install_layer(conv, 1, dims, sd)
    return conv


def _with_o_bias(conv):
    """A model with latent norms that still has biases (e.g. edited by hand after conversion)."""
    from latentkv.runtime.install import install_layer

    for i, layer in enumerate(conv.model.layers):
        sd = {**layer.self_attn.state_dict(), "o_proj.bias": torch.full((conv.config.hidden_size,), 0.1)}
        install_layer(conv, i, dataclasses.replace(layer.self_attn.dims, o_bias=True), sd)
    return conv


REFUSALS = {
    "no latent norm": (lambda: convert(make_tiny("llama-gqa"), LowRankConfig(kv_budget=0.5, rope="rorope-export"),
                                       calib_ids=calib(), progress=False), "--latent-norm"),
    "frequencies": (lambda: convert(make_tiny("llama-gqa"), LowRankConfig(kv_budget=0.5, latent_norm=True),
                                    calib_ids=calib(), progress=False), "rorope-export"),
    "biases": (lambda: _with_o_bias(target_model("llama-gqa")), "--target deepseek_v3, which folds them"),
    "sliding": (lambda: target_model("mistral-sliding"), "sliding-window"),
    "gemma2": (lambda: target_model("gemma2-softcap"), "soft-cap attention scores"),
    "per-layer ranks": (lambda: _per_layer_ranks(target_model("llama-gqa")), "per-layer ranks"),
    "nope layers": (lambda: target_model("smollm3-nope"), "NoPE"),
    "nope layers, native": (lambda: convert(make_tiny("smollm3-nope"), LowRankConfig(kv_budget=0.5), calib_ids=calib(),
                                            progress=False), "NoPE"),
    "qk-norm": (lambda: convert(make_tiny("olmo2-qknorm"), LowRankConfig(kv_budget=0.5), calib_ids=calib(),
                                progress=False), "QK-norm"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_export_refuses_with_reason(case, tmp_path):
    build, match = REFUSALS[case]
    with pytest.raises(LatentKVError, match=match):
        export(build(), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_target_conflicts_are_one_line():
    with pytest.raises(LatentKVError, match="--rope"):
        make_config(kv_budget=0.5, target="deepseek_v3", rope="rorope")
    with pytest.raises(LatentKVError, match="lowrank"):
        make_config(kv_budget=0.5, target="deepseek_v3", method="svd")
    cfg = make_config(kv_budget=0.5, target="deepseek_v3")
    assert (cfg.rope, cfg.latent_norm, cfg.rank_allocation) == ("rorope-export", True, "uniform")


def test_vllm_check_skips_cleanly_without_gpu(capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script runs for real there")
    spec = importlib.util.spec_from_file_location("vllm_check", Path(__file__).parents[2] / "scripts" / "vllm_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["vllm_check.py", "out", "--against", "dir", "--json"])
    assert mod.main() == 0
    assert "no CUDA GPU" in json.loads(capsys.readouterr().out)["skipped"]


def test_import_foreign_deepseek_v3_with_moe_and_q_lora(ids, tmp_path, tiny_tokenizer):
    """Anyone's DeepSeek-V3 checkpoint (MoE layers, q low-rank, its own rope_theta) runs in our runtime:
    same logits as stock transformers on both paths, latent-only cache, absorbed greedy decode."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from latentkv import LatentCache, generate, load_model

    cfg = DeepseekV3Config(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                           kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, num_mtp_layers=0,
                           max_position_embeddings=256)
    torch.manual_seed(0)
    stock = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    stock.save_pretrained(tmp_path / "foreign")
    tiny_tokenizer.save_pretrained(tmp_path / "foreign")
    ours, tok = load_model(tmp_path / "foreign")
    assert ours.config.latentkv["conversion"]["method"] == "import"
    with torch.no_grad():
        ref = stock(ids).logits
        for path in ("expanded", "absorbed"):
            assert (ours(ids, mla_path=path).logits - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), path
    out = generate(ours, tok, "The quick brown fox", 6, use_eos=False)
    prompt = tok("The quick brown fox", return_tensors="pt").input_ids
    theirs = stock.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.tokens[0] == theirs[0, prompt.shape[1]:].tolist()
    assert out.cache_bytes == LatentCache(ours).bytes_per_token() * (prompt.shape[1] + 6) == 2 * 32 * 4 * (
        prompt.shape[1] + 6)


def test_latent_norm_added_after_conversion_saves_and_loads(ids, tmp_path):
    from latentkv import load, save

    conv = convert(make_tiny("llama-gqa"), LowRankConfig(kv_budget=0.5, rope="rorope-export"), calib_ids=calib(),
                   progress=False)
    from latentkv.conversion.latent_norm import add_latent_norm

    add_latent_norm(conv, calib())
    assert all(d["latent_norm"] for d in conv.config.latentkv["layers"])
    save(conv, None, tmp_path / "native")
    back, _ = load(tmp_path / "native")
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, conv(ids).logits, atol=1e-6)
    export(conv, tmp_path / "ds")  # rorope-export alone keeps the latent bias-free, so a post-hoc norm exports
    with torch.no_grad():
        assert (load_stock(tmp_path / "ds")(ids).logits - conv(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "mistral-gqa"])
@pytest.mark.parametrize("slot0", [3, 5])
def test_second_components_export_exactly(name, slot0, tmp_path):
    """6 rope pairs as `slot0` first components + second components of the fastest frequencies: the
    export's YaRN (factor < 1) schedule gives transformers' rotary exactly our frequencies, and the
    stock model our logits."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3RotaryEmbedding

    model = make_tiny(name)
    conv = convert(model, make_config(kv_lora_rank=24, qk_rope_head_dim=12, target="deepseek_v3", rope_slot0=slot0),
                   calib_ids=calib(), progress=False)
    idx = conv.model.layers[0].self_attn.rope_freq_idx
    assert idx.tolist() == list(range(slot0)) + list(range(6 - slot0))
    export(conv, tmp_path / "ds")
    cfg = DeepseekV3Config.from_pretrained(tmp_path / "ds")
    engine = DeepseekV3RotaryEmbedding(cfg).inv_freq.double()
    src = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(engine, torch.cat((src[:slot0], src[:6 - slot0])), rtol=1e-5)
    x = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        assert (load_stock(tmp_path / "ds")(x).logits - conv(x).logits).abs().max() < 1e-4


def test_export_schedule_is_chosen_by_energy_and_recorded():
    conv = target_model("llama-mha")
    record = conv.config.latentkv
    pairs = record["layers"][0]["qk_rope_head_dim"] // 2
    slot0 = record["split_search"]["rope_slot0"]
    assert 1 <= slot0 <= pairs and conv.model.layers[1].self_attn.rope_freq_idx.tolist()[:slot0] == list(range(slot0))
    assert all(c.get("rope_slot0") for c in record["split_search"]["candidates"])


def test_best_schedule_keeps_most_energy():
    from latentkv.conversion.rope import best_schedule
    from latentkv.families import source_layout

    lay = source_layout(make_tiny("llama-gqa").config)  # 2 KV heads x 8 frequencies
    fast = torch.zeros(2, 8)
    fast[:, :2] = 1.0  # all energy in both components of the two fastest frequencies
    assert best_schedule([fast], lay, 4) == (2, 0)
    flat = torch.zeros(2, 8)
    flat[0] = 1.0  # only first components matter: keep 4 of them
    assert best_schedule([flat], lay, 4) == (4, 0)  # ties go to the plain schedule


def test_bad_slot0_is_one_line():
    with pytest.raises(LatentKVError, match="--rope-slot0 1 does not fit 6 rope pairs"):
        convert(make_tiny("llama-gqa"), make_config(kv_lora_rank=24, qk_rope_head_dim=12, target="deepseek_v3",
                                                    rope_slot0=1), calib_ids=calib(), progress=False)
    with pytest.raises(LatentKVError, match="needs --rope rorope-export"):
        make_config(kv_budget=0.5, rope_slot0=2)


def test_llama3_source_exports_a_schedule_every_engine_runs(tmp_path):
    """vLLM and SGLang replace any non-default DeepSeek rope type with their YaRN: a llama3 source keeps
    to its unscaled fastest frequencies (here 1), as plain RoPE plus YaRN's second run, never 'llama3'."""
    conv = convert(make_tiny("llama3-rope"), make_config(kv_lora_rank=24, qk_rope_head_dim=4, target="deepseek_v3"),
                   calib_ids=calib(), progress=False)
    assert conv.model.layers[0].self_attn.rope_freq_idx.tolist() == [0, 0]
    export(conv, tmp_path / "ds")
    rope = json.loads((tmp_path / "ds" / "config.json").read_text())["rope_scaling"]
    assert rope["rope_type"] == "yarn" and rope["factor"] < 1
    x = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        assert (load_stock(tmp_path / "ds")(x).logits - conv(x).logits).abs().max() < 1e-4


def test_export_streams_tensors_without_copying_the_state():
    """Only the folded/permuted attention tensors are new; the rest is written from the model's own memory."""
    from latentkv.deepseek.export import engine_tensors, exportable_dims, kept_frequencies, parse_size

    conv = target_model("llama-gqa")
    held = {p.data_ptr() for p in conv.state_dict().values()}
    names, shared = [], 0
    for name, t in engine_tensors(conv, exportable_dims(conv), kept_frequencies(conv)):
        names.append(name)
        shared += t.data_ptr() in held
        if name.endswith(("q_proj.weight", "kv_a_proj_with_mqa.weight")):
            assert t.data_ptr() not in held
    assert shared >= len(names) - 2 * len(conv.model.layers)  # all but q_proj and kv_a_proj per layer
    assert parse_size("100KB") == 100_000 and parse_size("5GB") == 5 * 10**9
    with pytest.raises(LatentKVError, match="--max-shard-size"):
        parse_size("lots")


def test_export_writes_a_model_card(tmp_path):
    conv = target_model("llama-gqa")
    export(conv, tmp_path / "ds")
    card = (tmp_path / "ds" / "README.md").read_text()
    d = conv.model.layers[0].self_attn.dims
    assert card.startswith("---\n") and "license:" in card and "- mla" in card
    assert f"kv_lora_rank {d.kv_lora_rank}, qk_rope_head_dim {d.qk_rope_head_dim}" in card
    latent, source = d.kv_lora_rank + d.qk_rope_head_dim, conv.config.latentkv["source"]["kv_values_per_token_per_layer"]
    assert f"{latent * 4 * 2:,} bytes against the base model's {source * 4 * 2:,}" in card  # fp32, 2 layers
    assert "vllm serve" in card and "sglang" in card and "--target deepseek_v3" in card
    assert "not a shape the fast MLA kernels" in card  # tiny ranks: the kernel note says so


def test_bf16_checkpoint_exports_its_query_unchanged(ids, tmp_path):
    """The engines' softmax scale is folded into the query when the latent norm is fitted (float32),
    so a bf16 checkpoint's export copies q_proj bit for bit instead of rounding a product again."""
    from latentkv import load, save

    conv = target_model("llama-gqa")
    d = conv.model.layers[0].self_attn.dims
    assert d.softmax_scale == pytest.approx((d.qk_nope_head_dim + d.qk_rope_head_dim) ** -0.5)
    assert d.softmax_scale != pytest.approx(16 ** -0.5)  # the source's scale differed: a real fold happened
    save(conv.to(torch.bfloat16), None, tmp_path / "bf16")
    export(load(tmp_path / "bf16", torch.bfloat16)[0], tmp_path / "ds")  # as `latentkv export` does (auto)
    ours, stock = load(tmp_path / "bf16")[0], load_stock(tmp_path / "ds")  # both run in float32, as verify-export
    w = "model.layers.0.self_attn.q_proj.weight"  # rope rows permuted to the interleaved layout, values copied
    # (times 1/2 under a skipping schedule's YaRN, a power of two that no dtype rounds)
    fold = query_fold(json.loads((tmp_path / "ds" / "config.json").read_text())["rope_scaling"] or {})
    assert torch.equal(stock.state_dict()[w].flatten().sort().values,
                       (ours.state_dict()[w] * fold).flatten().sort().values)
    with torch.no_grad():
        ref = ours(ids).logits
        assert ref.abs().max() > 1 and (stock(ids).logits - ref).abs().max().item() <= 1e-4
