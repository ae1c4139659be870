"""lm-eval-harness: the local tasks' builders, our runtime scored through HFLM (an exact conversion scores
as its source), the stock `--model hf` route on an export, and one-line refusals."""

import json

import pytest
import torch

from latentkv import convert
from latentkv.conversion.configs import ExactConfig
from latentkv.reports.harness import LOCAL_TASKS, build_local_tasks, cloze_docs, lastword_docs, run_tasks

from conftest import SAMPLE, make_tiny, run_cli

pytest.importorskip("lm_eval")


def test_lastword_docs_end_on_a_word_and_carry_two_sentences_before():
    lines = [f"sentence {i} has a few words and then ends with word{i}" for i in range(3)]
    lines += ["the fourth one has eight words and ends well", "too short N", "a sentence of enough words ending in N"]
    docs = lastword_docs("\n".join(lines), limit=10)
    assert docs == [{"context": " ".join(lines[1:3]) + " the fourth one has eight words and ends", "target": "well"}]


def test_cloze_docs_hold_the_answer_once_among_passage_words():
    docs = cloze_docs(" ".join(SAMPLE.split() * 20), limit=25, seed=3)
    assert len(docs) == 25
    for d in docs:
        context = d["context"].split()
        assert len(d["choices"]) == len(set(d["choices"])) == 4 and len(context) == 48
        assert all(c in context for i, c in enumerate(d["choices"]) if i != d["label"])  # distractors from it
    assert cloze_docs(" ".join(SAMPLE.split() * 20), limit=25, seed=3) == docs  # seeded


@pytest.fixture
def tasks_cache(tmp_path, monkeypatch):
    """The local tasks, built from ../shared/data into a fresh cache dir."""
    monkeypatch.setenv("LATENTKV_CACHE", str(tmp_path / "cache"))
    folder, built = build_local_tasks(docs=40)
    if set(built) != set(LOCAL_TASKS):
        pytest.skip("the local tasks need ../shared/data (PTB and the fiction corpus)")
    for name in built:
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 40
    return folder


def test_exact_conversion_scores_as_its_source_and_the_export_scores_stock(capsys, tasks_cache, tmp_path,
                                                                           tiny_tokenizer):
    """Through HFLM our exact conversion gives the source's scores; the DeepSeek-V3 export of a 50 %
    conversion, loaded by lm-eval's stock `hf` model (no latentkv code), gives our runtime's."""
    import lm_eval

    from latentkv.reports.harness import task_manager

    source = make_tiny("llama-gqa", layers=2)
    tasks = list(LOCAL_TASKS)
    ours = run_tasks(source, tiny_tokenizer, tasks, limit=6, max_length=256)
    exact = run_tasks(convert(source, ExactConfig(), progress=False), tiny_tokenizer, tasks, limit=6, max_length=256)
    assert ours["docs"] == {t: 6 for t in tasks}
    for t in tasks:
        for metric, value in ours["scores"][t].items():
            assert exact["scores"][t][metric] == pytest.approx(value, rel=1e-4), (t, metric)
    src, conv, ds = tmp_path / "src", tmp_path / "mla", tmp_path / "ds"
    source.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE * 3)
    assert run_cli(capsys, "convert", src, "--out", conv, "--kv-budget", 0.5, "--target", "deepseek_v3", "--calib",
                   tmp_path / "calib.txt", "--calib-samples", 4, "--calib-seq-len", 32)[0] == 0
    assert run_cli(capsys, "export", conv, "--out", ds)[0] == 0
    from latentkv import load_model

    native = run_tasks(*load_model(conv, progress=False), tasks, limit=6, max_length=256)
    stock = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={ds},dtype=float32,max_length=256",
                                    tasks=tasks, task_manager=task_manager(tasks), limit=6, bootstrap_iters=0,
                                    device="cpu")
    for t in tasks:
        for metric, value in native["scores"][t].items():
            assert stock["results"][t][f"{metric},none"] == pytest.approx(value, rel=1e-3), (t, metric)
    assert not torch.equal(torch.tensor(list(native["scores"][tasks[0]].values())),
                           torch.tensor(list(ours["scores"][tasks[0]].values())))  # a 50 % model differs


def test_eval_tasks_cli_and_refusals(capsys, tasks_cache, tmp_path, tiny_tokenizer):
    src = tmp_path / "src"
    make_tiny("llama-gqa", layers=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    code, stdout, err = run_cli(capsys, "eval", src, "--tasks", "latentkv_cloze_fiction", "--limit", 3, "--json",
                                "--seq-len", 256)
    assert code == 0, err
    res = json.loads(stdout)["tasks"]
    assert res["docs"] == {"latentkv_cloze_fiction": 3} and 0 <= res["scores"]["latentkv_cloze_fiction"]["acc"] <= 1
    for bad, match in (("no_such_task", "unknown lm-eval task(s): no_such_task"),
                       ("latentkv_nope", "local task(s) latentkv_nope unknown")):
        code, _, err = run_cli(capsys, "eval", tmp_path / "missing-model", "--tasks", bad)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and match in lines[0], err  # before the (missing) model loads
