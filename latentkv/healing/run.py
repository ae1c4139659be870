"""Healing a converted model by distillation from its source (or any teacher with the same vocab).

loss = kl_weight * T^2 KL(teacher || student) + ce_weight * next-token CE (+ hidden_weight * the
layers' relative hidden-state error, `losses.hidden_mse`), on packed windows of training text;
AdamW, linear warmup then cosine to min_lr_ratio * lr, gradient accumulation, optional gradient
checkpointing and bf16 autocast. What trains is a choice: `attention` (the converted MLA weights incl.
kv_a_layernorm; the default), `all`, or `lora` (peft adapters on the MLA projections, merged at the end).
An optional local stage fits each layer to the source first.
Long windows can be mixed in: every `long_every`-th step trains on windows of `long_seq_len` tokens
cut from the same token stream (same tokens per step), so the model sees dependencies longer than
`seq_len` without a separate, noisier long-window continuation afterwards.

One code path from a laptop to many GPUs: `accelerate` runs it as one process, or under
`accelerate launch` / `torchrun` with DDP (or FSDP from an accelerate config). A global step
always consumes `batch_size` windows: each process takes its share, in micro-batches, so the
result does not depend on the number of processes (up to float summation order) -- except for a
streamed `hf:` dataset, where each process reads and trains on its own shard of the stream.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_tensorboard_available, is_wandb_available
from safetensors.torch import load_file
from safetensors.torch import save as to_bytes

from ..errors import LatentKVError
from ..io.atomic import atomic_output_dir, check_output_dir, write_file_atomic
from ..io.machine import native_bf16
from ..io.plots import plot_title
from ..io.text import fingerprint
from ..loading import load_model, parse_dtype, stored_dtype
from ..record import record_of
from ..runtime.checkpoint import save
from .data import WindowOrder, check_copy_share, is_stream, pack, plant_copies, plant_long_copies, read_documents
from .local import local_heal
from .loop import select_trainable, train
from .state import latest_checkpoint, plot_losses, prepare_work_dir, read_log

TRAINABLE = ("attention", "all", "lora")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast where the hardware has bf16 matmuls
TRACKERS = ("none", "tensorboard", "wandb")  # accelerate's trackers; the JSONL log and loss plot are always written


@dataclass(frozen=True)
class HealConfig:
    tokens: int = 500_000  # training tokens (steps = tokens // (batch_size * seq_len))
    seq_len: int = 512
    batch_size: int = 8  # windows per optimizer step, all processes together
    micro_batch: int = 1  # windows per forward on one process
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0  # > 0: also match every layer's hidden state to the teacher's (live teacher only)
    train: str = "attention"
    rest_lr_ratio: float = 1.0  # with train "all": the lr of the weights outside attention, as a fraction of lr
    lora_rank: int = 16
    gradient_checkpointing: bool = False
    precision: str = "auto"
    seed: int = 0
    save_every: int = 50  # optimizer steps between checkpoints
    teacher_topk: int = 64  # kept per token when a teacher cache is used
    local_steps: int = 0  # > 0: local layer-wise stage first, this many Adam steps per layer
    local_windows: int = 16
    local_lr: float = 1e-3
    long_seq_len: int = 0  # > 0 (with long_every): the length of the long windows
    long_every: int = 0  # every long_every-th optimizer step is one of long windows
    average_last: float = 0.0  # > 0: the saved weights are the mean over this fraction of the last steps
    copy_share: float = 0.0  # > 0: this fraction of the windows carries a planted copy drill (data.plant_copies)
    long_copy_share: float = 0.0  # > 0: this fraction of the long windows carries a long-range copy drill

    def __post_init__(self):
        if self.train not in TRAINABLE:
            raise LatentKVError(f"unknown --train {self.train!r}; choose one of {', '.join(TRAINABLE)}")
        if self.precision not in PRECISIONS:
            raise LatentKVError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.kl_weight <= 0 and self.ce_weight <= 0 and self.hidden_weight <= 0:
            raise LatentKVError("--kl-weight, --ce-weight and --hidden-weight are all 0: nothing to train on")
        if self.rest_lr_ratio <= 0 or (self.rest_lr_ratio != 1.0 and self.train != "all"):
            raise LatentKVError(f"--rest-lr-ratio {self.rest_lr_ratio}: it must be > 0 and goes with --train all "
                                "(the weights outside attention train only then)")
        if not 0 <= self.average_last <= 1:
            raise LatentKVError(f"--average-last {self.average_last}: give the fraction of the last optimizer steps "
                                "to average the weights over, between 0 (off) and 1")
        check_copy_share(self.copy_share)
        check_copy_share(self.long_copy_share, "--long-copy-share")
        if self.hidden_weight < 0:
            raise LatentKVError(f"--hidden-weight must be >= 0, got {self.hidden_weight}")
        for name in ("seq_len", "batch_size", "micro_batch", "save_every"):
            if getattr(self, name) < 1:
                raise LatentKVError(f"--{name.replace('_', '-')} must be >= 1")
        self._check_long()

    def _check_long(self) -> None:
        if (self.long_seq_len > 0) != (self.long_every > 0):
            raise LatentKVError("--long-seq-len and --long-every go together: give both (e.g. --long-seq-len 4096 "
                                "--long-every 4) or neither")
        if self.long_copy_share and not self.long_seq_len:
            raise LatentKVError("--long-copy-share plants drills in the long windows: give --long-seq-len and "
                                "--long-every too")
        if self.long_seq_len and self.long_seq_len <= self.seq_len:
            raise LatentKVError(f"--long-seq-len {self.long_seq_len} must be longer than --seq-len {self.seq_len}")
        if self.long_seq_len and self.long_seq_len < self.tokens_per_step and self.tokens_per_step % self.long_seq_len:
            raise LatentKVError(f"--long-seq-len {self.long_seq_len} must divide the tokens per step "
                                f"({self.tokens_per_step} = batch size x seq len) or be at least that long, "
                                f"e.g. {self.tokens_per_step}")

    @property
    def long_batch(self) -> int:
        """Long windows per long step: the short steps' tokens, or one window when a long window holds more
        (small short batches for more optimizer steps, long windows still as long as the context asked for)."""
        return max(1, self.tokens_per_step // self.long_seq_len) if self.long_seq_len else 0

    def is_long(self, step: int) -> bool:
        """Whether 0-based optimizer step `step` trains on long windows."""
        return self.long_every > 0 and (step + 1) % self.long_every == 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def long_step_tokens(self) -> int:
        return self.long_batch * self.long_seq_len

    def step_tokens(self, step: int) -> int:
        """Training tokens of 0-based optimizer step `step`."""
        return self.long_step_tokens if self.is_long(step) else self.tokens_per_step

    def tokens_through(self, steps: int) -> int:
        """Training tokens of the first `steps` optimizer steps."""
        n_long = steps // self.long_every if self.long_every else 0
        return n_long * self.long_step_tokens + (steps - n_long) * self.tokens_per_step

    def steps(self) -> int:
        """The most optimizer steps whose tokens stay within --tokens."""
        n = self.tokens // self.tokens_per_step
        while n > 0 and self.tokens_through(n) > self.tokens:
            n -= 1
        if n < 1 and self.tokens > 0:
            raise LatentKVError(f"--tokens {self.tokens} is smaller than one batch (batch size {self.batch_size} x "
                                f"seq len {self.seq_len} = {self.tokens_per_step} tokens); raise --tokens or "
                                "lower --batch-size / --seq-len")
        return n

    def accumulation(self, processes: int) -> int:
        if self.long_batch % processes:
            raise LatentKVError(f"{self.long_batch} long window(s) per step do not split over {processes} processes; "
                                "pick a --long-seq-len that leaves a multiple of the process count per step")
        per = self.micro_batch * processes
        if self.batch_size % per:
            raise LatentKVError(f"--batch-size {self.batch_size} is not a multiple of micro batch x processes "
                                f"({self.micro_batch} x {processes}); pick a batch size divisible by {per}")
        return self.batch_size // per


def heal(student, teacher, data, out, config: HealConfig = HealConfig(), *, overwrite: bool = False,
         resume: bool = False, work_dir=None, teacher_cache=None, progress: bool = True,
         dtype: torch.dtype | str = "auto", report_to: str = "none") -> dict:
    """Distil `teacher` into the converted `student` (paths or names) on `data`; save to `out`.

    data: text file, folder of .txt, `hf:` spec, datasets.Dataset or list of str.
    -> report dict (steps, tokens, seconds, tokens/s, first/last loss, local stage); also stored in
    the output's conversion record under "heal". Checkpoints in `work_dir` (default OUT.heal).
    dtype: of the saved checkpoint ("auto": as the student is stored); training keeps float32 weights.
    report_to: an accelerate tracker that also gets every step's row (TensorBoard files end in OUT/trackers).
    """
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".heal")
    precision = resolve_precision(config.precision, "cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",  # autocast: loop.autocast
                      log_with=tracker(report_to), project_dir=str(work / TRACKER_DIR))
    check_output_dir(out, overwrite, inputs=tuple(x for x in (student, teacher) if isinstance(x, (str, Path))))
    if config.hidden_weight > 0 and teacher_cache:
        raise LatentKVError("--hidden-weight needs the live teacher's hidden states, which a --teacher-cache does not "
                            "hold; drop one of the two")
    steps = config.steps()
    config.accumulation(acc.num_processes)  # fails early, with the fix, when the batch does not split
    out_dtype = saved_dtype(student, dtype)
    if steps == 0 and config.local_steps <= 0:
        raise LatentKVError("--tokens 0 and no --local-steps: nothing to do; give --tokens N or --local-steps N")
    t_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # frozen: no fp32 master needed
    model, tok, teacher_model = load_pair(student, teacher, acc.device, t_dtype)
    # a streamed dataset is read only as far as the run's windows, each process its own shard of it (then
    # a step takes each process's share from its own windows); other data is whole on every process
    sharded = is_stream(data) and acc.num_processes > 1
    windows = training_windows(tok, data, config, acc, steps, sharded, model.config.vocab_size)
    run = {"config": dataclasses.asdict(config), "data": fingerprint(windows), "windows": int(windows.shape[0]),
           "student": _name(student), "teacher": _name(teacher), "processes": acc.num_processes}
    ckpt = (prepare_work_dir(work, run, resume, overwrite, dataclasses.asdict(HealConfig()))
            if acc.is_main_process else None)
    acc.wait_for_everyone()
    if not acc.is_main_process and resume:
        ckpt = latest_checkpoint(work)
    if report_to != "none":
        acc.init_trackers("latentkv-heal", config={k: v for k, v in run["config"].items() if v is not None})
    local = run_local_stage(model, teacher_model, windows, config, work, acc, progress)
    if sharded and teacher_cache:  # window ids are per process: one cache folder each
        teacher_cache = Path(teacher_cache) / f"process-{acc.process_index}-of-{acc.num_processes}"
    resolved = dataclasses.replace(config, precision=precision)
    report, model = train(acc, model, teacher_model, windows, resolved, steps, work, ckpt, teacher_cache, progress,
                          sharded=sharded)
    report.update(local=local, precision=precision, data=_name(data), teacher=_name(teacher),
                  data_fingerprint=run["data"])
    for t in acc.trackers:  # flushed before the output copies them (end_training would also end DDP)
        t.finish()
    final = gathered_model(acc, model, student, config)
    if acc.is_main_process:
        save_healed(final.to(out_dtype), tok, out, overwrite, report, work)
    acc.wait_for_everyone()
    return report


def training_windows(tok, data, config: HealConfig, acc, steps: int, sharded: bool, vocab: int) -> torch.Tensor:
    """-> (N, seq_len) packed windows, copy drills planted (before the fingerprint: a teacher cache and a resume
    must see the planted windows; long drills first: a short drill may overwrite part of one, never the reverse).
    A stream is read only as far as the run's windows, each process its shard."""
    needed = max(steps * config.batch_size // acc.num_processes, 1) if is_stream(data) else None
    windows = pack(tok, read_documents(data, (acc.process_index, acc.num_processes) if sharded else None),
                   config.seq_len, max_windows=needed)
    ids, special = min(len(tok), vocab), tok.all_special_ids
    if config.long_copy_share:
        windows = plant_long_copies(windows, config.long_seq_len, config.long_copy_share, config.seed, ids, special)
    if config.copy_share:
        windows = plant_copies(windows, config.copy_share, config.seed, ids, special)
    return windows


def resolve_precision(precision: str, device: str) -> str:
    """--precision -> "bf16" or "fp32". auto: bf16 autocast (fp32 master weights and loss) where `device`
    multiplies bf16 natively, 1.4x the fp32 step on an AVX512-BF16 CPU (BENCHMARKS.md, "heal-step");
    elsewhere bf16 is emulated and slower, so an explicit bf16 there gets a warning."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"this {device} has no native bf16 matmul: bf16 autocast may be slower than fp32 here",
                      stacklevel=3)
    return precision


def saved_dtype(student, dtype) -> torch.dtype:
    """The healed checkpoint's dtype: `dtype`, or (auto) the student's stored one."""
    dtype = parse_dtype(dtype)
    if dtype != "auto":
        return dtype
    if isinstance(student, tuple):
        return next(student[0].parameters()).dtype
    return stored_dtype(student)


TRACKER_DIR = "trackers"  # in the work dir while training; copied into the output at the end


def tracker(report_to: str):
    """--report-to -> accelerate's `log_with`; one line when unknown or not installed."""
    if report_to not in TRACKERS:
        raise LatentKVError(f"unknown --report-to {report_to!r}; choose one of {', '.join(TRACKERS)}")
    if report_to == "none":
        return None
    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]():
        raise LatentKVError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")
    return report_to


def gathered_model(acc, model, student, config):
    """The trained model, whole, on the main process. Under FSDP the parameters are shards: every
    process joins the gather, and the main one loads the full state into a fresh copy."""
    if acc.distributed_type != DistributedType.FSDP:
        return acc.unwrap_model(model)
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    fresh = select_trainable(load_model(student, progress=False)[0], config)
    fresh.load_state_dict(state)
    return fresh


def _name(x) -> str:
    """A short, stable name for a path, a (model, tokenizer) pair or in-memory data."""
    if isinstance(x, tuple):
        return str(getattr(x[0].config, "_name_or_path", "") or type(x[0]).__name__)
    return str(x) if isinstance(x, (str, Path)) else type(x).__name__


def load_pair(student, teacher, device, teacher_dtype=torch.float32):
    """-> (student in train mode, tokenizer, frozen teacher); refuses vocabularies that differ."""
    model, tok = student if isinstance(student, tuple) else load_model(student, progress=False)
    if tok is None:
        raise LatentKVError(f"{student} has no tokenizer files; re-run `latentkv convert` from a source with one")
    t_model, t_tok = teacher if isinstance(teacher, tuple) else load_model(teacher, dtype=teacher_dtype,
                                                                           progress=False)
    if record_of(model) is None and not merged_heads_of(model, t_model):
        raise LatentKVError(f"{student} is not a latentkv conversion (nor a `--target gqa` merge of the teacher); "
                            "heal a `latentkv convert` output")
    check_same_vocab(model, tok, t_model, t_tok)
    t_model.requires_grad_(False)
    return model.to(device), tok, t_model.to(device).eval()


def merged_heads_of(model, teacher) -> bool:
    """True for a stock `--target gqa` result of `teacher`: its class and shape, fewer KV heads."""
    a, b = model.config, teacher.config
    same = type(model) is type(teacher) and all(getattr(a, k, None) == getattr(b, k, None) for k in
                                                 ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    return same and a.num_key_value_heads < b.num_key_value_heads


def check_same_vocab(model, tok, t_model, t_tok) -> None:
    sv, tv = model.get_output_embeddings().weight.shape[0], t_model.get_output_embeddings().weight.shape[0]
    if sv != tv:
        raise LatentKVError(f"teacher and student vocabularies differ ({tv} vs {sv} logits); distil from the "
                            "source model the student was converted from, or a teacher with the same tokenizer")
    if t_tok is not None and t_tok.get_vocab() != tok.get_vocab():
        raise LatentKVError("teacher and student tokenizers differ (same size, other tokens); distil from the "
                            "source model the student was converted from, or a teacher with the same tokenizer")


def run_local_stage(model, teacher, windows, config: HealConfig, work: Path, acc, progress: bool) -> dict | None:
    """The layer-wise stage, once per run: its result is kept in the work dir for a resume."""
    if config.local_steps <= 0:
        return None
    saved, meta = work / "local.safetensors", work / "local.json"
    if saved.is_file() and meta.is_file():
        model.load_state_dict(load_file(str(saved)), strict=False)
        return json.loads(meta.read_text())
    pick = WindowOrder(windows.shape[0], config.seed + 7919).take(0, min(config.local_windows, windows.shape[0]))
    report = local_heal(model, teacher, windows[pick], steps=config.local_steps, lr=config.local_lr,
                        seed=config.seed, progress=progress and acc.is_main_process)
    if acc.is_main_process:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if ".self_attn." in k}
        write_file_atomic(saved, to_bytes(state))
        write_file_atomic(meta, json.dumps(report))
    return report


def save_healed(model, tok, out: Path, overwrite: bool, report: dict, work: Path) -> None:
    """Merge LoRA if any, record the healing in the conversion record, save natively with the log (a
    stock `--target gqa` student: as a stock checkpoint, the healing in `heal.json` beside it)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    healing = {k: v for k, v in report.items() if k != "log"}
    if record_of(model) is not None:
        model.config.latentkv["heal"] = healing
    log = work / "log.jsonl"

    def add_log(tmp: Path) -> None:
        if (work / TRACKER_DIR).is_dir():
            shutil.copytree(work / TRACKER_DIR, tmp / TRACKER_DIR)
        if log.is_file():
            shutil.copy(log, tmp / "heal_log.jsonl")
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            plot_losses(read_log(log), tmp / "heal_loss.png", f"healing {out.name}\n" + plot_title(
                f"teacher {report.get('teacher', '?')}", dtype))

    if record_of(model) is not None:
        save(model, tok, out, overwrite=overwrite, extra=add_log)
    else:
        with atomic_output_dir(out, overwrite) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_file_atomic(tmp / "heal.json", json.dumps(healing, indent=2, default=str))
            add_log(tmp)
    shutil.rmtree(work, ignore_errors=True)  # the output is whole: checkpoints are no longer needed
    report["out"] = str(out)
    report["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
