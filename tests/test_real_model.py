"""The bundled SmolLM2-135M (Llama, 30 layers, 9 query / 3 KV heads): the invariants on real weights."""

import copy
import math

import pytest
import torch

from latentkv import ExactConfig, LatentCache, SVDConfig, convert
from latentkv.evaluation.perplexity import perplexity
from latentkv.io.text import shared_file

pytestmark = pytest.mark.real

PARAGRAPH = ("Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on the "
             "television series The Bill in 2000. This was followed by a starring role in the play Herons written "
             "by Simon Stephens, which was performed in 2001 at the Royal Court Theatre. He had a guest role in the "
             "television series Judge John Deed in 2002. ")


@pytest.fixture(scope="module")
def exact(smollm2):
    return convert(smollm2[0], ExactConfig(), progress=False)


@pytest.fixture
def attn_impl(smollm2, exact):
    """Set both models' attention kernel; restore sdpa afterwards."""
    def use(impl):
        smollm2[0].config._attn_implementation = exact.config._attn_implementation = impl
    yield use
    use("sdpa")


def test_full_budget_logits_match(smollm2, exact, attn_impl):
    """With the same deterministic kernel (eager) the full-budget model gives the source's logits to
    1e-4 (in practice bit for bit). SDPA's CPU kernel blocks differently for the wider q/k heads, so
    there the bound is the source's own fp32 rounding error (vs fp64), or 1e-4 if larger."""
    model, tok = smollm2
    ids = tok(PARAGRAPH * 3, return_tensors="pt").input_ids  # (1, 265)
    with torch.no_grad():
        attn_impl("eager")
        assert (exact(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
        attn_impl("sdpa")
        ref = model(ids).logits
        diff = (exact(ids).logits - ref).abs().max().item()
        rounding = (ref.double() - copy.deepcopy(model).double()(ids).logits).abs().max().item()
    assert diff <= max(1e-4, 2 * rounding), f"max abs logit diff {diff:.2e}, source rounding {rounding:.2e}"


def test_two_window_ppl_within_one_percent(smollm2, exact):
    model, tok = smollm2
    path = shared_file("wikitext2")
    text = path.read_text(encoding="utf-8")[:60000] if path else PARAGRAPH * 40
    src = perplexity(model, tok, text, seq_len=512, max_windows=2, progress=False)
    conv = perplexity(exact, tok, text, seq_len=512, max_windows=2, progress=False)
    assert math.isfinite(conv.ppl) and conv.windows == 2 and conv.tokens == src.tokens == 2 * 511
    assert abs(conv.ppl / src.ppl - 1) < 0.01


def test_reduced_budget_cache_and_paths(smollm2):
    model, tok = smollm2
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    prompt = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        a = conv(prompt, mla_path="expanded").logits
        b = conv(prompt, mla_path="absorbed").logits
    assert (a - b).abs().max().item() < 1e-3 * a.abs().max().item()
    cache = LatentCache(conv)
    kw = dict(max_new_tokens=16, do_sample=False)
    cached = conv.generate(prompt, cache=cache, **kw)
    assert torch.equal(cached, conv.generate(prompt, use_cache=False, **kw))
    assert cache.bytes_per_token() == 30 * 192 * 4  # 50% of 2*3*64 values, 30 layers, fp32
    assert cache.nbytes() == cache.bytes_per_token() * (cached.shape[1] - 1)


def test_absorbed_generation_matches_transformers(smollm2):
    """Greedy tokens of our loop (absorbed decode over a preallocated latent cache) == transformers'
    generate of the same converted model, and the cache holds exactly bytes_per_token x tokens."""
    from latentkv import generate

    model, tok = smollm2
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    ours = generate(conv, tok, PARAGRAPH, 16, use_eos=False)
    theirs = conv.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tokens[0] == theirs[0, ids.shape[1]:].tolist()
    assert ours.cache_bytes == LatentCache(conv).bytes_per_token() * (ids.shape[1] + 16)


def test_deepseek_v3_export_verifies(smollm2, tmp_path):
    """SmolLM2 converted for DeepSeek-V3 (export rope, fitted latent norm), exported, and loaded by stock
    transformers: same logits and greedy tokens as our runtime, a latent-only stock cache; and the
    fitted norm costs little against the same conversion without it."""
    import json

    from latentkv import LowRankConfig, save
    from latentkv.cli import main

    model, tok = smollm2
    config = LowRankConfig(kv_lora_rank=160, qk_rope_head_dim=32, rope="rorope-export", calib_samples=4,
                           calib_seq_len=256, temperature_seq_len=512)  # temperatures folded in: the export carries them
    plain = convert(model, config, tokenizer=tok, progress=False)
    normed = convert(model, LowRankConfig(**{**config.__dict__, "latent_norm": True}), tokenizer=tok, progress=False)
    ids = tok(PARAGRAPH * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(m(ids).logits[0, :-1], ids[0, 1:]).item() for m in (plain, normed)]
    assert nll[1] < nll[0] + 0.1, nll
    save(normed, tok, tmp_path / "native")
    assert main(["export", str(tmp_path / "native"), "--out", str(tmp_path / "ds")]) == 0
    rep = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert rep["tie_word_embeddings"] and rep["rope_theta"] == pytest.approx(100000 ** (32 / 64))  # the 16 fastest frequencies
    from latentkv.reports.verify import verify_export

    res = verify_export(tmp_path / "ds", tmp_path / "native")
    assert res["passed"] and res["max_abs_diff"] < 1e-3, res
    assert res["cache_bytes_per_token"] == 30 * (160 + 32) * 4


def test_heal_recovers_on_real_model(smollm2, tmp_path):
    """SmolLM2 at 25 % (weight SVD, very lossy): a short local stage plus a few distillation steps on
    Gutenberg-style prose bring the student closer to the source on an unseen paragraph."""
    from latentkv import HealConfig, heal, load, save
    from latentkv.healing.losses import kl_full

    model, tok = smollm2
    conv = convert(model, SVDConfig(kv_budget=0.25), progress=False)
    save(conv, tok, tmp_path / "conv")
    text = [f"Chapter {i}. " + PARAGRAPH for i in range(12)]
    cfg = HealConfig(tokens=4 * 2 * 128, seq_len=128, batch_size=2, lr=1e-4, local_steps=8, local_windows=4)
    report = heal(tmp_path / "conv", (model, tok), text, tmp_path / "healed", cfg, progress=False)
    assert report["steps"] == 4 and sum(r["after"] for r in report["local"]["layers"]) < sum(
        r["before"] for r in report["local"]["layers"])
    healed, _ = load(tmp_path / "healed")
    ids = tok("The committee met again in the spring to review the survey results.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        kl = [float(kl_full(m(ids).logits, ref)) for m in (conv, healed)]
    assert kl[1] < 0.8 * kl[0], kl
