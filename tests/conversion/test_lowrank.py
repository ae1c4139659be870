"""The calibrated method over every RoPE strategy x factorizer on tiny models."""

import itertools

import pytest
import torch

from latentkv import LatentCache, convert, record_of
from latentkv.conversion.configs import LowRankConfig
from latentkv.conversion.rope import ROPE_STRATEGIES, KeySplit, RoRoPE
from latentkv.conversion.search import COPY_TIE_NATS, pick_split
from latentkv.conversion.statistics import InputStats, Moments, collect_stats, record_attention_inputs
from latentkv.errors import LatentKVError
from latentkv.families import attention_layers, source_layout
from latentkv.io.text import check_not_test_split

from conftest import make_tiny

METHODS = list(itertools.product(list(ROPE_STRATEGIES), ["svd", "pca", "output"]))


@pytest.fixture(scope="module")
def calib_ids():
    torch.manual_seed(3)
    return torch.randint(0, 320, (10, 32))  # 6 fit + 4 held-out windows


def _x():
    torch.manual_seed(4)
    return torch.randint(0, 320, (2, 24))


@pytest.mark.parametrize("rope, factorizer", METHODS)
def test_full_budget_is_exact(rope, factorizer, calib_ids):
    """Every key dim rotated and a full-rank latent: each combination must reproduce the source.
    The export-compatible RoRoPE keeps one component per frequency, so it can only keep every
    rotation with a single KV head (MQA)."""
    model = make_tiny("llama-mqa" if rope == "rorope-export" else "qwen2-bias")
    lay = source_layout(model.config)
    p = r = lay.num_kv_heads * lay.head_dim
    conv = convert(model, LowRankConfig(kv_lora_rank=r, qk_rope_head_dim=p, rope=rope, factorizer=factorizer),
                   calib_ids=calib_ids, progress=False)
    with torch.no_grad():
        assert (conv(_x()).logits - model(_x()).logits).abs().max().item() < 1e-5


def test_rorope_rotation_alone_is_exact(calib_ids):
    """Mixing KV heads per frequency commutes with RoPE: with every pair kept, nothing changes."""
    model = make_tiny("llama-gqa")
    lay = source_layout(model.config)
    full = lay.num_kv_heads * lay.head_dim
    stats = collect_stats(model, calib_ids, progress=False)
    from latentkv.families import read_attention

    src = read_attention(attention_layers(model)[0])
    for fold in (1, 2, 4):
        p = RoRoPE.rotation(src, lay, stats[0].sigma, fold)  # (C, C)
        assert torch.allclose(p @ p.T, torch.eye(p.shape[0], dtype=p.dtype), atol=1e-10)
        # fold 1 mixes only channels of one frequency (it commutes with RoPE)
        half = lay.head_dim // 2
        freq = torch.arange(p.shape[0]) % half
        assert (p.abs() > 1e-12).logical_and(freq[:, None] != freq[None]).any() == (fold > 1)
    conv = convert(model, LowRankConfig(kv_lora_rank=full, qk_rope_head_dim=full, rope="rorope", factorizer="pca"),
                   calib_ids=calib_ids, progress=False)
    assert conv.model.layers[0].self_attn.dims.qk_nope_head_dim == 0
    with torch.no_grad():
        assert (conv(_x()).logits - model(_x()).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("rope, factorizer", METHODS)
def test_cache_equals_budget_and_error_falls_with_budget(rope, factorizer, calib_ids):
    model = make_tiny("llama-mha")
    src_values = source_layout(model.config).kv_values_per_token
    errs = []
    with torch.no_grad():
        ref = model(_x()).logits
        for budget in (0.125, 0.25, 0.5):
            conv = convert(model, LowRankConfig(kv_budget=budget, rope=rope, factorizer=factorizer),
                           calib_ids=calib_ids, progress=False)
            cache = LatentCache(conv)
            conv(_x(), cache=cache, use_cache=True)
            assert cache.bytes_per_token() == round(budget * src_values) * 4 * 2  # fp32, 2 layers
            errs.append((conv(_x()).logits - ref).pow(2).mean().item())
    assert errs[0] >= errs[1] >= errs[2], errs


def test_split_search_is_recorded(calib_ids):
    conv = convert(make_tiny("llama-gqa"), LowRankConfig(kv_values=24), calib_ids=calib_ids, progress=False)
    search = record_of(conv)["split_search"]
    assert search["values"] == 24 and len(search["candidates"]) >= 2
    best = pick_split(search["candidates"])
    assert all(c["score"] == pytest.approx(c["heldout_nll"] + c["copy_nll"]) for c in search["candidates"])
    assert best["heldout_nll"] <= min(c["heldout_nll"] for c in search["candidates"]) + COPY_TIE_NATS
    dims = conv.model.layers[0].self_attn.dims
    assert (dims.kv_lora_rank, dims.qk_rope_head_dim) == (best["kv_lora_rank"], best["qk_rope_head_dim"])


def test_pick_split_ranks_by_heldout_nll_and_copy_breaks_near_ties():
    """The sum NLL + copy NLL would take `b` (lower copy NLL); the rule takes the lowest NLL `a` unless
    another is within COPY_TIE_NATS of it, and then the better copier among the near-ties."""
    def cand(name, nll, copy):
        return {"name": name, "heldout_nll": nll, "copy_nll": copy, "score": nll + copy}

    far = [cand("a", 4.162, 12.50), cand("b", 4.309, 12.11)]
    assert pick_split(far)["name"] == "a"
    near = [cand("a", 4.162, 12.50), cand("b", 4.162 + COPY_TIE_NATS / 2, 12.11), cand("c", 5.0, 1.0)]
    assert pick_split(near)["name"] == "b"
    assert pick_split(near, tie=0.0)["name"] == "a"


def test_default_rope_is_chosen_on_held_out_windows_and_recorded(calib_ids):
    """Without --rope the split search tries every AUTO_ROPES strategy at every split; the record names
    the winner (as `conversion.rope`) and keeps each candidate's held-out NLL. An explicit --rope, the
    export target and fixed ranks try one strategy only."""
    from latentkv.conversion.configs import AUTO_ROPES, config_from_dict, make_config

    config = make_config(kv_budget=0.5)
    assert (config.rope, *config.rope_choices) == AUTO_ROPES
    conv = convert(make_tiny("llama-gqa"), config, calib_ids=calib_ids, progress=False)
    record = record_of(conv)
    search = record["split_search"]
    assert {c["rope"] for c in search["candidates"]} == set(AUTO_ROPES)
    best = pick_split(search["candidates"])
    assert record["conversion"]["rope"] == search["rope"] == best["rope"]
    assert all("heldout_nll" in c for c in search["candidates"])
    assert config_from_dict(record["conversion"]).rope == best["rope"]  # the record reads back as applied
    assert make_config(kv_budget=0.5, rope="rorope").rope_choices == ()
    assert make_config(kv_budget=0.5, target="deepseek_v3").rope_choices == ()
    assert make_config(kv_lora_rank=8, qk_rope_head_dim=4).rope_choices == ()
    one = convert(make_tiny("llama-gqa"), make_config(kv_budget=0.5, rope="rorope"), calib_ids=calib_ids,
                  progress=False)
    assert {c["rope"] for c in record_of(one)["split_search"]["candidates"]} == {"rorope"}


def test_sequential_and_one_shot_differ_but_both_work(calib_ids):
    model = make_tiny("llama-gqa", layers=3)
    outs = []
    for seq in (True, False):
        conv = convert(model, LowRankConfig(kv_budget=0.25, sequential=seq), calib_ids=calib_ids, progress=False)
        with torch.no_grad():
            outs.append(conv(_x()).logits)
    assert torch.isfinite(outs[0]).all() and not torch.equal(outs[0], outs[1])


def test_moments_do_not_depend_on_batching():
    torch.manual_seed(0)
    x = torch.randn(6, 10, 8)
    whole, parts = Moments.empty(8), Moments.empty(8)
    whole.add(x)
    for chunk in x.split(1):
        parts.add(chunk)
    assert whole.tokens == parts.tokens == 60
    assert torch.allclose(whole.second(), parts.second(), atol=1e-6)
    assert torch.allclose(whole.second()[:8, :8], (x.reshape(-1, 8).T @ x.reshape(-1, 8)).double() / 60, atol=1e-5)


def test_hooks_are_removed():
    model = make_tiny("llama-gqa")
    attns = attention_layers(model)
    with record_attention_inputs(attns, [Moments.empty(64) for _ in attns]):
        assert all(a._forward_pre_hooks for a in attns)
    assert not any(a._forward_pre_hooks for a in attns)


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "../shared/data/wikitext-2-raw/wiki.test.raw", "x/ptb.test.txt"])
def test_test_split_is_never_calibration(name):
    with pytest.raises(LatentKVError, match="must not be used for calibration"):
        check_not_test_split(name)
    with pytest.raises(LatentKVError, match="must not be used for calibration"):
        LowRankConfig(kv_budget=0.5, calib=name)


def test_export_flags():
    model = make_tiny("llama-gqa")
    from latentkv.families import read_attention

    src, lay = read_attention(attention_layers(model)[0]), source_layout(model.config)
    assert ROPE_STRATEGIES["rorope-export"].split(src, lay, 4).exportable()
    assert ROPE_STRATEGIES["high"].split(src, lay, 4).exportable()  # 2 KV heads' fastest two: two runs
    assert not KeySplit(((0, 0), (1, 0), (1, 1))).exportable()  # a second component beyond the first run
    sigma = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))  # an unseen direction: damped
    r = InputStats(sigma).factor
    assert torch.allclose(r @ r.T, sigma, atol=1e-6) and torch.equal(r, r.tril()) and r.diagonal().min() > 0


def test_mean_rotation_matches_average_rotated_score():
    """(M^T q) . k must equal the mean over distances t < horizon of the true RoPE score q_t . k_0."""
    from latentkv.conversion.keys import mean_rotated
    from latentkv.runtime.kernels import rotate_half

    model = make_tiny("llama-mqa")
    lay = source_layout(model.config)
    d, horizon = lay.head_dim, 50
    torch.manual_seed(0)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    theta = torch.tensor(lay.inv_freq, dtype=torch.float64)
    scores = []
    for t in range(horizon):
        ang = torch.cat((theta, theta)) * t
        q_t = q * ang.cos() + rotate_half(q) * ang.sin()  # query at position t, key at position 0
        scores.append(q_t @ k)
    wq = torch.zeros(d, 2, dtype=torch.float64)
    wq[:, 0] = q  # one head's query as a weight column (augmented layout: last column = bias)
    q_mean = mean_rotated(wq, lay, horizon)[:, 0]
    assert torch.allclose(q_mean @ k, torch.stack(scores).mean(), atol=1e-10)


def test_thin_svd_through_the_gram_matrix_matches_lapack(monkeypatch):
    """The 7B/8B path (eigh of M M^T) gives LAPACK's singular values and rank-r approximations."""
    from latentkv.conversion import linalg as factorize

    torch.manual_seed(0)
    m = torch.randn(40, 300, dtype=torch.float64) * torch.logspace(0, -4, 300, dtype=torch.float64)
    u0, s0, vh0 = torch.linalg.svd(m, full_matrices=False)
    monkeypatch.setattr(factorize, "GRAM_SVD_ELEMENTS", 1)
    for mat, (u0, s0, vh0) in ((m, (u0, s0, vh0)), (m.T, (vh0.T, s0, u0.T))):  # wide and tall
        u, s, vh = factorize.thin_svd(mat)
        assert torch.allclose(s, s0, rtol=1e-9, atol=1e-12)
        for r in (1, 7, 40):
            assert torch.allclose(u[:, :r] * s[:r] @ vh[:r], u0[:, :r] * s0[:r] @ vh0[:r], atol=1e-10)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "llama-mha"])
def test_shared_nope_group_keeps_d_query_dims_and_the_same_scores(name, calib_ids):
    """RoRoPE leaves one shared nope group of n = G*d - p dims. The MLA query keeps only the head's
    d source rows and W_uk absorbs the map, so q_proj stays small; every score q_nope . k_nope is the
    one the k'-space queries (`nope_queries`) give, biases included."""
    from latentkv.conversion.keys import assemble, nope_queries, split_keys, stack_nope_kv
    from latentkv.conversion.linalg import low_rank
    from latentkv.families import read_attention

    model = make_tiny(name)
    lay = source_layout(model.config)
    stats = collect_stats(model, calib_ids, progress=False)[0]
    src = read_attention(attention_layers(model)[0])
    split = ROPE_STRATEGIES["rorope"].split(src, lay, 4, stats.sigma, 512)
    parts = split_keys(src, lay, split, 512)
    n = parts["k_nope"].shape[1]
    assert n == lay.num_kv_heads * lay.head_dim - 8 > lay.head_dim and parts["q_map"] is not None
    assert parts["k_nope"].shape[0] == 1  # one shared nope group: W_uk is the same (n, r) block for every head
    a, b = low_rank(stack_nope_kv(parts, src).double(), 12, stats)
    sd = assemble(lay, src, parts, a, b)
    H, d, r = lay.num_heads, lay.head_dim, 12
    # without a query bias the query is held factored (keys.factored_query): the source rows and a map
    assert ("q_head_map" in sd) == (src.b_q is None) and ("q_proj.weight" in sd) == (src.b_q is not None)
    if "q_head_map" in sd:
        assert sd["q_head_map"].shape == (H, d + 8, d) and torch.equal(sd["q_src_proj.weight"], src.w_q.float())
        dense = torch.einsum("hkd,hdD->hkD", sd["q_head_map"], sd["q_src_proj.weight"].view(H, d, -1))
        sd["q_proj.weight"] = dense.reshape(H * (d + 8), -1)
    q = torch.cat((sd["q_proj.weight"], sd.get("q_proj.bias", torch.zeros(len(sd["q_proj.weight"])))[:, None]), 1)
    q_nope = q.view(H, d + 8, -1)[:, :d].double()  # (H, d, D+1)
    w_uk = sd["kv_b_proj.weight"].view(H, d + d, r)[:, :d].double()  # (H, d, r)
    ref_q = nope_queries(parts)  # (H, n, D+1) in k' space
    ref_uk = b[: n].view(1, n, r).expand(H, n, r)
    got = q_nope.transpose(1, 2) @ w_uk  # (H, D+1, r): the bilinear form between input and latent
    want = ref_q.transpose(1, 2) @ ref_uk
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert sd["q_proj.weight"].shape[0] == H * (d + 8)  # d nope + p rope rows per head, not n + p


def test_group_sum_of_mapped_query_moments():
    from latentkv.conversion.metrics import _group_sum

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    m = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    heads = torch.tensor([True, False, True, True, False, False])
    want = sum(m[h] @ a[h] @ m[h].T for h in (0, 2, 3))
    assert torch.allclose(_group_sum(a, m, heads), want, atol=1e-12)
    assert torch.allclose(_group_sum(a, None, heads), a[[0, 2, 3]].sum(0))


def test_per_head_strategies_keep_their_pairs():
    """MHA2MLA's S_high, S_low and S_uniform: the same pairs in every KV head (8 pairs per head here)."""
    lay = source_layout(make_tiny("llama-gqa").config)  # 2 KV heads, head_dim 16
    kept = {name: ROPE_STRATEGIES[name].split(None, lay, 8).kept for name in ("high", "low", "uniform")}
    assert kept["high"] == tuple((g, i) for g in range(2) for i in range(4))
    assert kept["low"] == tuple((g, i) for g in range(2) for i in range(4, 8))
    assert kept["uniform"] == tuple((g, i) for g in range(2) for i in (0, 2, 4, 6))
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        ROPE_STRATEGIES["low"].split(None, lay, 3)


def test_separate_key_and_value_latents(calib_ids):
    """DiffQKV-style latents: at full rank the same function as the joint latent; below it, kv_b_proj is
    block-diagonal (keys read only their latent dims, values theirs) and the cache counts both."""
    model = make_tiny("llama-gqa")  # 2 KV heads of 16: 8 rope dims leave 24 nope rows and 32 value rows
    kw = dict(qk_rope_head_dim=8, rope="rorope-export", rope_slot0=4)
    joint = convert(model, LowRankConfig(kv_lora_rank=56, **kw), calib_ids=calib_ids, progress=False)
    apart = convert(model, LowRankConfig(kv_lora_rank=56, kv_separate=True, **kw), calib_ids=calib_ids, progress=False)
    with torch.no_grad():
        assert (joint(_x()).logits - apart(_x()).logits).abs().max().item() < 1e-5
    small = convert(model, LowRankConfig(kv_lora_rank=40, kv_separate=True, **kw), calib_ids=calib_ids, progress=False)
    attn = small.model.layers[0].self_attn
    d = attn.dims
    w = attn.kv_b_proj.weight.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
    key_cols = w[:, : d.qk_nope_head_dim].abs().sum((0, 1)) > 0  # latent dims the keys read
    val_cols = w[:, d.qk_nope_head_dim:].abs().sum((0, 1)) > 0
    assert not (key_cols & val_cols).any() and key_cols.any() and val_cols.any()
    assert d.kv_lora_rank == 40 and small.config.latentkv["conversion"]["kv_separate"]


def test_factored_query_holds_the_source_rows_and_a_small_map(calib_ids):
    """RoRoPE's query is d source rows + p rope rows per head, all maps of the head's own d rows: held as
    q_src_proj (the source's W_q, bit for bit) and q_head_map, fewer weights than the dense q_proj, with
    the same logits on both paths, cached or not."""
    model = make_tiny("llama-gqa")
    lay = source_layout(model.config)
    conv = convert(model, LowRankConfig(kv_lora_rank=24, qk_rope_head_dim=8, rope="rorope"), calib_ids=calib_ids,
                   progress=False)
    attn = conv.model.layers[0].self_attn
    H, d, D, p = lay.num_heads, lay.head_dim, lay.hidden_size, 8
    assert attn.dims.q_factored and not hasattr(attn, "q_proj")
    assert torch.equal(attn.q_src_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert attn.q_src_proj.weight.numel() + attn.q_head_map.numel() == H * d * D + H * (d + p) * d < H * (d + p) * D
    x = _x()
    with torch.no_grad():
        ref = conv(x, mla_path="expanded").logits
        cache = LatentCache(conv)
        conv(x[:, :-1], cache=cache, mla_path="absorbed")
        step = conv(x[:, -1:], cache=cache).logits[:, -1]
    assert (conv(x, mla_path="absorbed").logits - ref).abs().max() < 1e-5
    assert (step - ref[:, -1]).abs().max() < 1e-5
