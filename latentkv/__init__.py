"""latentkv: convert GQA/MHA language models to Multi-head Latent Attention (DeepSeek-V3 MLA).

Importing the package loads nothing heavy; names resolve on first use. Subpackages, top to bottom
(an import never points up; `lint-imports` checks it): cli -> reports | healing -> loading ->
deepseek -> conversion -> runtime | evaluation -> io | families | record -> errors.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "latentkv.loading",
    "load_text": "latentkv.io.text",
    "convert": "latentkv.conversion.dispatch",
    "to_gqa": "latentkv.conversion.gqa",
    "CacheFormat": "latentkv.runtime.quant",
    "record_of": "latentkv.record",
    "ExactConfig": "latentkv.conversion.configs",
    "SVDConfig": "latentkv.conversion.configs",
    "LowRankConfig": "latentkv.conversion.configs",
    "LatentCache": "latentkv.runtime.cache",
    "MLAAttention": "latentkv.runtime.mla",
    "MLADims": "latentkv.runtime.mla",
    "save": "latentkv.runtime.checkpoint",
    "load": "latentkv.runtime.checkpoint",
    "cache_report": "latentkv.runtime.accounting",
    "LatentKVError": "latentkv.errors",
    "generate": "latentkv.runtime.generation",
    "perplexity": "latentkv.evaluation.perplexity",
    "passkey": "latentkv.evaluation.passkey",
    "heal": "latentkv.healing.run",
    "HealConfig": "latentkv.healing.run",
    "local_heal": "latentkv.healing.local",
    "export": "latentkv.deepseek.export",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentkv' has no attribute {name!r}")
