"""`verify-export`: does a stock engine load our export and compute what our runtime computes?

Loads OUT with stock `AutoModelForCausalLM` (no remote code, safetensors only) and the native
conversion with our runtime, runs both on the same tokens (fp32 unless `dtype`), and reports the largest logit
difference, teacher-forced greedy agreement, whether greedy generation gives the same tokens, and
the bytes per token the stock model's own cache holds (it must be latent-sized). It passes when the logits
are within `atol`, greedy generation is identical and the cache is latent-sized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..errors import LatentKVError, first_line
from ..io.checkpoint import META
from ..io.shards import check_weights
from ..loading import load_model
from ..record import bias_folds, record_of
from ..runtime.accounting import cache_report
from ..runtime.generation import cache_tensor_bytes, generate

SAMPLE_TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
               "grain, salt and wool. Over the following centuries the town grew into a regional centre, with a "
               "cathedral, a market square and a university that attracted students from across the continent. "
               "In the nineteenth century the railway arrived, and with it new industries: textile mills, "
               "breweries and an ironworks that employed thousands of workers. ")


def check_export_dir(out) -> None:
    if not Path(out).is_dir():
        raise LatentKVError(f"export {out} not found; pass the directory `latentkv export` wrote")
    if (Path(out) / META).is_file() and not (Path(out) / "config.json").is_file():
        raise LatentKVError(f"{out} is a native latentkv checkpoint, not an export; run `latentkv export {out} "
                            "--out DIR` and verify DIR against it")
    check_weights(out)


def load_stock(out, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    check_export_dir(out)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, use_safetensors=True,
                                                           local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise LatentKVError(f"stock transformers cannot load {out}: {first_line(e)}") from None
    if type(model).__name__ != "DeepseekV3ForCausalLM":
        raise LatentKVError(f"{out} loads as {type(model).__name__}, not DeepseekV3ForCausalLM; is it an export?")
    missing = [k for k in info["missing_keys"] if not k.endswith("lm_head.weight")]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        bad = (missing or info["unexpected_keys"] or info["mismatched_keys"])[:3]
        raise LatentKVError(f"stock load of {out} left tensors missing, unexpected or mis-shaped ({bad}); re-export")
    return model.eval()


@torch.no_grad()
def verify_export(out, against, text: str | None = None, tokens: int = 128, new_tokens: int = 16,
                  atol: float = 1e-3, progress: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """-> {max_abs_diff, greedy_agreement, generation_match, cache_bytes_per_token, expected_..., passed}."""
    check_export_dir(out)  # a missing or broken export is one error line, with no bar before it
    with tqdm(total=3, desc="verify-export", disable=not progress) as bar:  # closed (its line ended) on errors too
        bar.set_postfix_str("loading the export with stock transformers and ours")
        stock = load_stock(out, dtype)
        ours, tok = load_model(against, dtype=dtype, progress=False)
        if tok is None:
            raise LatentKVError(f"{against} has no tokenizer files; verify-export needs one to make sample tokens")
        bar.update()
        bar.set_postfix_str("comparing logits")
        ids = tok(text or SAMPLE_TEXT * 4, return_tensors="pt").input_ids[:, :tokens]  # (1, T)
        ref = ours(ids).logits
        got = stock(ids, use_cache=True)
        bar.update()
        bar.set_postfix_str("greedy generation, both")
        prompt = tok.decode(ids[0, :32], skip_special_tokens=True)
        prompt_ids = tok(prompt, return_tensors="pt").input_ids
        stock_new = stock.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        ours_new = generate(ours, tok, [prompt], new_tokens, use_eos=False)
        bar.update()
    diff = (got.logits - ref).abs().max().item()
    agree = (got.logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    held = cache_tensor_bytes(got.cache) // ids.shape[1]
    expected = cache_report(ours)["model"]["bytes_per_token"]
    match = stock_new[0, prompt_ids.shape[1]:].tolist() == ours_new.tokens[0]
    return {"out": str(out), "against": str(against), "tokens": int(ids.shape[1]), "max_abs_diff": diff,
            "greedy_agreement": agree, "generation_match": match, "cache_bytes_per_token": held,
            "expected_cache_bytes_per_token": expected, "atol": atol, "dtype": str(dtype).removeprefix("torch."),
            # teacher-forced agreement is reported, not required: with every logit within `diff` of ours, a
            # different argmax can only be a top-2 gap under 2 x diff (a near-tie, common in bf16)
            "passed": bool(diff <= atol and match and held == expected),
            # what the export-grade conversion approximated of the source (both sides compute it alike)
            "folded_biases": bias_folds(record_of(ours))}
