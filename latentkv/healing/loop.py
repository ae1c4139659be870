"""The distillation loop: one optimizer step = `batch_size` windows over all processes."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..errors import LatentKVError
from ..io.text import fingerprint
from .average import TailAverage, first_averaged_step
from .data import WindowOrder, cut_long
from .losses import TeacherCache, cross_entropy, hidden_mse, kl_full, kl_topk, teacher_topk
from .state import StepLog, read_progress, save_checkpoint


def select_trainable(model, config):
    """-> the model to train (a peft wrapper for `lora`), with requires_grad set per config.train."""
    if config.train == "all":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    attention = attention_modules(model)
    if config.train == "attention":
        for attn in attention:
            attn.requires_grad_(True)
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LatentKVError("--train lora needs peft: pip install 'latentkv[heal]'") from None

    targets = sorted({name for attn in attention for name, m in attn.named_children() if isinstance(m, torch.nn.Linear)})
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, lora)


def attention_modules(model) -> list[torch.nn.Module]:
    """Every decoder layer's attention: what `--train attention` trains and `--rest-lr-ratio` leaves at --lr."""
    return [layer.self_attn for layer in model.model.layers]


def param_groups(model, params: list, config) -> list:
    """AdamW's params: `params` as one group (model order, so older checkpoints resume), or with rest_lr_ratio != 1
    the attention weights at config.lr and the rest at lr * rest_lr_ratio (the converted attention has the most to
    relearn; the MLPs and embeddings only adapt to it)."""
    if config.rest_lr_ratio == 1.0:
        return params
    in_attention = {id(p) for attn in attention_modules(model) for p in attn.parameters()}
    return [{"params": [p for p in params if id(p) in in_attention]},
            {"params": [p for p in params if id(p) not in in_attention], "lr": config.lr * config.rest_lr_ratio}]


def train(acc, model, teacher, windows: torch.Tensor, config, steps: int, work: Path, ckpt,
          teacher_cache, progress: bool, sharded: bool = False):
    """-> (report, trained model as prepared by accelerate). Checkpoints every config.save_every.
    sharded: `windows` are this process's own (a streamed shard), else every process holds them all."""
    model, params, opt, sched, average, start = prepare_training(acc, model, config, steps, ckpt)
    log = StepLog(work / "log.jsonl", start, acc.is_main_process)
    batches = StepBatches(windows, config, acc, sharded, teacher_cache)
    bar = tqdm(total=steps, initial=start, unit="step", desc="heal", disable=not (progress and acc.is_main_process))
    times, first, last = [], None, None
    for step in range(start, steps):
        t0 = time.perf_counter()
        data, idx, step_cache = batches.at(step)
        loss, kl, ce, hidden, norm = optimizer_step(acc, model, teacher, data, idx, config, step_cache, params, opt,
                                                    sched)
        average.update(step + 1)
        times.append(time.perf_counter() - t0)
        first, last = (loss if first is None else first), loss
        tps = config.step_tokens(step) / times[-1]
        parts = {"hidden": hidden} if config.hidden_weight else {}  # the column only when the loss has the term
        row = {"step": step + 1, "tokens": config.tokens_through(step + 1), "loss": loss, "kl": kl, "ce": ce,
               "lr": sched.get_last_lr()[0], "grad_norm": float(norm), "tokens_per_s": round(tps, 1),
               "time": round(times[-1], 3), "seq_len": int(data.shape[1]), **parts}
        log.write(row)
        acc.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)  # a no-op without --report-to
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
        if (step + 1) % config.save_every == 0 and step + 1 < steps:
            save_checkpoint(acc, work, {"step": step + 1, "tokens": config.tokens_through(step + 1)},
                            extra=lambda folder: average.save(folder, acc.process_index))
    bar.close()
    report = train_report(config, acc, steps, start, times, first, last, log.rows())
    report["averaged_steps"] = average.apply()
    return report, model


def prepare_training(acc, model, config, steps: int, ckpt):
    """-> (model, trainable params, optimizer, schedule, tail average, first step), resumed from `ckpt` if any."""
    model = select_trainable(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, params, config), lr=config.lr, weight_decay=config.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, round(config.warmup_ratio * steps), max(steps, 1),
                                                        min_lr_rate=config.min_lr_ratio)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)  # not prepared: accelerate would step it once per process
    # the optimizer's own tensors: under FSDP, prepare replaces the parameters with its flat shards
    average = TailAverage([p for g in opt.param_groups for p in g["params"]],
                          first_averaged_step(steps, config.average_last))
    return model, params, opt, sched, average, restore(acc, ckpt, average)


class StepBatches:
    """Which windows each step reads: short windows in a seeded order, and on long steps one long window
    each (`long_windows`), which the teacher cache does not hold, so those steps use the live teacher."""

    def __init__(self, windows: torch.Tensor, config, acc, sharded: bool, teacher_cache):
        self.windows, self.config, self.acc, self.sharded = windows, config, acc, sharded
        self.cache = None
        if teacher_cache:
            self.cache = TeacherCache(teacher_cache, {"data": fingerprint(windows), "seq_len": config.seq_len,
                                                      "topk": config.teacher_topk, "temperature": config.temperature})
        self.order = WindowOrder(windows.shape[0], config.seed)
        self.long = long_windows(windows, config)
        self.long_order = WindowOrder(self.long.shape[0], config.seed + 1) if self.long is not None else None

    def at(self, step: int):
        """-> (windows (N, T), this step's row indices, teacher cache or None)."""
        c = self.config
        if c.is_long(step):
            k = step // c.long_every  # long steps before this one: one long window per forward
            return self.long, step_ids(self.long_order, k, c.long_batch, 1, self.acc, self.sharded), None
        return self.windows, step_ids(self.order, step, c.batch_size, c.micro_batch, self.acc, self.sharded), self.cache


def restore(acc, ckpt, average: TailAverage) -> int:
    """Load a checkpoint (accelerate's state and the tail average) -> the optimizer steps it holds (0: none)."""
    if ckpt is None:
        return 0
    acc.load_state(str(ckpt))
    average.load(ckpt, acc.process_index)
    return read_progress(ckpt)["step"]


def step_ids(order: WindowOrder, k: int, count: int, micro: int, acc, sharded: bool) -> torch.Tensor:
    """This process's share of the k-th draw of `count` windows (all processes together)
    -> (accum, micro) ids into its windows. Sharded data: each process draws from its own windows;
    otherwise every process draws the same global batch and keeps its slice."""
    if sharded:
        per = count // acc.num_processes
        return order.take(k * per, per).view(-1, micro)
    idx = order.take(k * count, count)
    return idx.view(acc.num_processes, -1, micro)[acc.process_index]


def long_windows(windows: torch.Tensor, config) -> torch.Tensor | None:
    """(N, seq_len) packed windows -> (M, long_seq_len): the same token stream cut longer (a view), or None."""
    if not config.long_seq_len:
        return None
    long = cut_long(windows, config.long_seq_len)
    if long.shape[0] < config.long_batch:
        raise LatentKVError(f"the training data ({windows.numel():,} tokens) is shorter than one step of "
                            f"--long-seq-len {config.long_seq_len} windows; give more text or shorter long windows")
    return long


def optimizer_step(acc, model, teacher, windows, idx: torch.Tensor, config, cache, params, opt, sched):
    """One global step over this process's windows idx (accum, micro_batch): accumulate, clip, step
    -> (loss, kl, ce, hidden) averaged over processes, and the gradient norm."""
    accum = idx.shape[0]
    parts = torch.zeros(4, device=acc.device)
    for k in range(accum):
        sync = acc.no_sync(model) if k < accum - 1 else contextlib.nullcontext()
        with sync:
            loss, kl, ce, hidden = micro_loss(acc, model, teacher, windows, idx[k], config, cache)
            acc.backward(loss / accum)
        parts += torch.stack([loss.detach(), kl, ce, hidden]) / accum
    norm = acc.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return (*acc.reduce(parts, "mean").tolist(), norm)


def train_report(config, acc, steps: int, start: int, times: list[float], first, last, rows: list[dict]) -> dict:
    return {"train": config.train, "steps": steps, "tokens": config.tokens_through(steps),
            "resumed_at_step": start, "processes": acc.num_processes,
            # reduced over processes, so every process reports the same; a resumed run's first is the log's
            "first_loss": rows[0]["loss"] if start and rows else first,
            "last_loss": last if last is not None else (rows[-1]["loss"] if rows else None),
            "median_step_s": round(statistics.median(times), 4) if times else None,
            # this process's steps only (a resume's earlier ones are not timed here); long steps may hold more tokens
            "tokens_per_s": round((config.tokens_through(steps) - config.tokens_through(start)) / sum(times), 1)
            if times else None,
            "seconds": round(sum(r["time"] for r in rows), 2) if rows else round(sum(times), 2)}


def autocast(acc, config):
    """bf16 autocast when config.precision is "bf16" (heal resolves "auto" before training). Ours rather than
    accelerate's mixed_precision, which is fixed once per process: a second heal in the same process (the
    benchmarks run several) may want the other precision."""
    return torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def micro_loss(acc, model, teacher, windows: torch.Tensor, idx: torch.Tensor, config, cache):
    """idx (micro_batch,) window ids -> (loss, kl, ce, hidden), scalars; the parts detached for logging."""
    ids = windows[idx].to(acc.device)  # (b, T)
    hidden = config.hidden_weight > 0
    target, t_hidden = teacher_targets(acc, teacher, ids, idx, config, cache, hidden)
    with autocast(acc, config):
        out = model(input_ids=ids, output_hidden_states=hidden)
    logits = out.logits  # (b, T, V)
    zero = torch.zeros((), device=acc.device)
    kl = (kl_topk(logits, *target, config.temperature) if cache is not None
          else kl_full(logits, target, config.temperature)) if config.kl_weight > 0 else zero
    ce = cross_entropy(logits, ids) if config.ce_weight > 0 else zero
    mse = hidden_mse(out.hidden_states, t_hidden) if hidden else zero
    loss = config.kl_weight * kl + config.ce_weight * ce + config.hidden_weight * mse
    return loss, kl.detach(), ce.detach(), mse.detach()


@torch.no_grad()
def teacher_targets(acc, teacher, ids: torch.Tensor, idx: torch.Tensor, config, cache, hidden: bool = False):
    """-> (teacher logits (b, T, V), or with a cache top-k log-probs and ids (b, T, k) each; the teacher's
    per-layer hidden states when `hidden` (live teacher only), else None)."""
    if cache is None:
        with autocast(acc, config):
            out = teacher(input_ids=ids, output_hidden_states=hidden)
        return out.logits, (out.hidden_states if hidden else None)
    hits = [cache.get(int(w)) for w in idx]
    if any(h is None for h in hits):
        with autocast(acc, config):
            logits = teacher(input_ids=ids).logits
        vals, top = teacher_topk(logits, config.teacher_topk, config.temperature)
        for j, w in enumerate(idx):
            cache.put(int(w), vals[j], top[j])
        return (vals, top), None
    return (torch.stack([h[0] for h in hits]).to(acc.device), torch.stack([h[1] for h in hits]).to(acc.device)), None
