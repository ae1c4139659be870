"""latentkv: convert GQA/MHA language models to Multi-head Latent Attention (DeepSeek-V3 MLA).

Importing the package loads nothing heavy; names resolve on first use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "latentkv.loading",
    "load_text": "latentkv.text",
    "convert": "latentkv.conversion",
    "record_of": "latentkv.conversion",
    "ExactConfig": "latentkv.methods",
    "SVDConfig": "latentkv.methods",
    "LowRankConfig": "latentkv.methods",
    "LatentCache": "latentkv.cache",
    "MLAAttention": "latentkv.mla",
    "MLADims": "latentkv.mla",
    "save": "latentkv.checkpoint",
    "load": "latentkv.checkpoint",
    "cache_report": "latentkv.report",
    "LatentKVError": "latentkv.errors",
    "generate": "latentkv.generation",
    "heal": "latentkv.healing",
    "HealConfig": "latentkv.healing",
    "local_heal": "latentkv.layerwise",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "evaluate":
        import importlib

        return importlib.import_module("latentkv.evaluate")
    raise AttributeError(f"module 'latentkv' has no attribute {name!r}")
