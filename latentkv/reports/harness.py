"""Zero-shot tasks through lm-eval-harness on our runtime objects, plus local tasks built from the text
on this machine (hub tasks cannot download here).

`run_tasks` hands lm-eval's `HFLM` the model object itself, so a native latentkv conversion is scored
by the same code as its source; an export needs no latentkv at all (`lm_eval --model hf --model_args
pretrained=EXPORT`). The local tasks are lm-eval task YAML over JSONL files that `build_local_tasks`
writes into the cache dir from held-out text:

- `latentkv_lastword_ptb`: PTB test sentences whose last word is a lowercase word of 3+ letters (not
  `N` or `<unk>`); the context is the two sentences before and the sentence without its last word, the
  target the last word (LAMBADA-style: `acc` = greedy decoding gives the whole word, and perplexity).
- `latentkv_cloze_fiction`: 4-way cloze over the held-out fiction books (never calibration or healing
  text): a 48-word passage, the answer is its next word, the 3 distractors other words of the same
  passage (seeded), so the text in context never tells which one follows (`acc`, `acc_norm`).
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

from ..errors import LatentKVError
from ..io.atomic import write_file_atomic
from ..io.domains import domain_text
from ..loading import cache_dir

log = logging.getLogger(__name__)

TASKS_VERSION = 2  # bump when a builder changes: the files are rebuilt under a new folder
LOCAL_TASKS = ("latentkv_lastword_ptb", "latentkv_cloze_fiction")
_WORD = re.compile(r"[a-z]{3,}")
_HEADER = re.compile(r"pg\d+_\S+\.txt")  # the book name `domain_text` puts before each book


def lastword_docs(text: str, limit: int) -> list[dict]:
    """PTB text (one sentence per line) -> up to `limit` {context, target} docs, in text order."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    docs = []
    for i, line in enumerate(lines):
        words = line.split()
        if len(words) >= 8 and _WORD.fullmatch(words[-1]) and i >= 2:
            docs.append({"context": " ".join([*lines[i - 2: i], *words[:-1]]), "target": words[-1]})
            if len(docs) == limit:
                break
    return docs


def cloze_docs(text: str, limit: int, seed: int = 0, span: int = 48) -> list[dict]:
    """Running text -> up to `limit` {context, choices, label} 4-way cloze docs from disjoint passages."""
    words, rng, docs = [w for w in text.split() if not _HEADER.fullmatch(w)], random.Random(seed), []
    for start in range(0, len(words) - span - 1, span + 1):
        context, answer = words[start: start + span], words[start + span]
        if not _WORD.fullmatch(answer):
            continue
        pool = sorted({w for w in context if _WORD.fullmatch(w) and w != answer})
        if len(pool) < 3:
            continue
        choices = [answer, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        docs.append({"context": " ".join(context), "choices": choices, "label": choices.index(answer)})
        if len(docs) == limit:
            break
    return docs


def _yaml(name: str, data: Path, multiple_choice: bool) -> str:
    """lm-eval task YAML (JSON is YAML) over one local JSONL file."""
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{context}}", "metadata": {"version": TASKS_VERSION}}
    if multiple_choice:
        task.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="label",
                    metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                 for m in ("acc", "acc_norm")])
    else:
        task.update(output_type="loglikelihood", doc_to_target="{{' ' + target}}",
                    metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                 {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return json.dumps(task, indent=2)


def build_local_tasks(folder: str | Path | None = None, docs: int = 1000) -> tuple[Path, list[str]]:
    """Write the local tasks whose text is on this machine -> (the include folder, their names)."""
    folder = Path(folder) if folder else cache_dir() / "lm_eval_tasks" / f"v{TASKS_VERSION}-{docs}"
    folder.mkdir(parents=True, exist_ok=True)
    built = []
    for name, domain, make, mc in (("latentkv_lastword_ptb", "ptb", lastword_docs, False),
                                   ("latentkv_cloze_fiction", "fiction", cloze_docs, True)):
        data = folder / f"{name}.jsonl"
        if not data.is_file():
            try:
                text = domain_text(domain, "eval", size=4_000_000)
            except LatentKVError as e:
                log.info("local task %s skipped: %s", name, e)
                continue
            rows = make(text, docs)
            write_file_atomic(data, "".join(json.dumps(r) + "\n" for r in rows))
        write_file_atomic(folder / f"{name}.yaml", _yaml(name, data, mc))
        built.append(name)
    return folder, built


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LatentKVError("--tasks needs lm-eval: pip install 'latentkv[eval]' (or pip install lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager with the local tasks included; one line for a task it does not know (call it
    before loading a model)."""
    _, _, TaskManager = _lm_eval()
    folder, local = build_local_tasks()
    missing = [t for t in tasks if t.startswith("latentkv_") and t not in local]
    if missing:
        raise LatentKVError(f"local task(s) {', '.join(missing)} unknown or without their text here; the local "
                            f"tasks are {', '.join(LOCAL_TASKS)} (built from ../shared/data)")
    manager = TaskManager(include_path=str(folder))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LatentKVError(f"unknown lm-eval task(s): {', '.join(unknown)}; see `lm_eval ls tasks`, or the local "
                            f"{', '.join(LOCAL_TASKS)}")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1,
              max_length: int = 2048, manager=None) -> dict:
    """Score `model` (a source or a latentkv conversion, in memory) on lm-eval tasks: hub task names or
    LOCAL_TASKS -> {"scores": {task: {metric: value}} (stderr dropped), "docs": {task: n}, "limit"}."""
    lm_eval, HFLM, _ = _lm_eval()
    manager = manager or task_manager(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    scores = {name: {k.split(",")[0]: v for k, v in res.items() if isinstance(v, float) and "stderr" not in k}
              for name, res in out["results"].items()}
    docs = {name: n.get("effective", n.get("original")) for name, n in out.get("n-samples", {}).items()}
    return {"scores": scores, "docs": docs, "limit": limit}
