"""Parity of our nine task definitions with lm-eval 0.4.13's built-in ones, on the same records.

For each task, lm-eval's own YAML (under lm_eval/tasks/, with its own process_docs / doc_to_* functions) is
loaded directly, with only its dataset pointed at our prepared JSONL files, and compared with our rendered YAML
(eval.taskgen) over those same files: every request (type, doc, index, arguments = context and continuation)
in order, and per document the processed record, the gold target and doc_to_text (the gold index for
WinoGrande's partial scoring) must be identical, zero-shot and with two seeded few-shot examples.

Which splits exist is a property of the data folder, not of the task definition: both tasks get the same split
keys from `eval.taskgen.split_keys` (a split whose file is absent is null; with no few-shot split left, a
test-split task draws from its test split with `fewshot_split` set so lm-eval leaves the current document out).
That is the one deliberate difference from lm-eval's YAML run on the HF hub, and it is stated in eval/README.md.

Run: python -m pytest tests/unit/test_eval_parity.py -x -q
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from eval.benchmarks import EVAL_SPLIT, TASKS, data_file, split_file
from eval.prepare import write_jsonl_gz
from eval.taskgen import declared_splits, split_files, split_keys, write_task_configs

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "data" / "benchmarks"

BUILTIN_YAML = {  # lm-eval 0.4.13's task file for each of ours, relative to lm_eval/tasks/
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "wikitext": "wikitext/wikitext.yaml",
}
LIMIT = 12  # documents per task (wikitext has 5)
SEED = 1234


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def builtin_task(task: str, data_dir: Path, cache_dir: Path):
    """lm-eval's own task, loaded from its YAML; only the dataset (and the absent splits) point elsewhere."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / BUILTIN_YAML[task])
    files = split_files(data_dir, task)
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {s: str(p) for s, p in files.items()}, "cache_dir": str(cache_dir)},
        **split_keys(task, files),
    )
    return ConfigurableTask(config=cfg)


def our_tasks(data_dir: Path, out_dir: Path) -> dict:
    """Our nine tasks, loaded the way eval.harness.run_benchmarks loads them."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(write_task_configs(data_dir, out_dir)), include_defaults=False)
    return {name.removeprefix("gptflow_"): t for name, t in get_task_dict([f"gptflow_{t}" for t in TASKS], tm).items()}


def requests(task, num_fewshot: int) -> list[tuple]:
    """Everything lm-eval will score, in order, with the gold of each request's document."""
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=SEED)
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    return [
        (i.request_type, i.doc_id, i.idx, i.args, i.doc, task.doc_to_target(i.doc), task.doc_to_text(i.doc))
        for i in task.instances
    ]


def _with_train_split(tmp: Path) -> Path:
    """A data folder whose evaluation files are the bundle's first 40 records and whose `train` split (for
    the tasks that declare one) is records 100-199 of the same file: a few-shot pool apart from the eval docs."""
    out = tmp / "with_train"
    for task in TASKS:
        recs = _read(data_file(BUNDLE, task))
        write_jsonl_gz(recs[:40], data_file(out, task))
        if declared_splits(task)["training_split"] == "train" and len(recs) >= 200:
            write_jsonl_gz(recs[100:200], split_file(out, task, "train"))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("parity")
    return {"eval_split_only": BUNDLE, "with_train": _with_train_split(tmp)}


@pytest.mark.parametrize("folder", ["eval_split_only", "with_train"])
def test_requests_identical_to_lm_eval_builtin_tasks(folders, folder, tmp_path):
    data_dir = folders[folder]
    ours = our_tasks(data_dir, tmp_path / "ours")
    assert set(ours) == set(TASKS)
    for task in TASKS:
        builtin = builtin_task(task, data_dir, tmp_path / "builtin_cache")
        for shots in (0, 2):
            mine, ref = requests(ours[task], shots), requests(builtin, shots)
            n_docs = min(LIMIT, len(_read(data_file(data_dir, task))))
            assert len({r[1] for r in ref}) == n_docs, (task, shots)
            assert mine == ref, f"{task} ({folder}, {shots}-shot): our requests differ from lm-eval's"
            if shots and task != "wikitext":  # few-shot examples really are in the context (rolling: none)
                assert all(m[3][0] != r[3][0] for m, r in zip(mine, requests(ours[task], 0), strict=True)), task


def test_fewshot_comes_from_the_tasks_own_split_when_present(folders, tmp_path):
    ours = our_tasks(folders["with_train"], tmp_path / "ours")
    train = {r["question"] for r in _read(split_file(folders["with_train"], "arc_easy", "train"))}
    evals = {r["question"] for r in _read(data_file(folders["with_train"], "arc_easy"))}
    reqs = requests(ours["arc_easy"], 2)
    for _, _, _, (ctx, _), _, _, _ in reqs:
        shots = [q.split("\nAnswer:")[0] for q in ctx.split("Question: ")[1:-1]]
        assert len(shots) == 2 and set(shots) <= train and not set(shots) & evals, ctx[:200]
    assert split_keys("arc_easy", ["test", "train"])["training_split"] == "train"


@pytest.mark.parametrize("task", ["arc_easy", "piqa"])  # a test-split task and a validation-split task
def test_fallback_to_eval_split_leaves_the_current_document_out(task, tmp_path):
    """With only the evaluation split, each document's two examples are the *other* two of a 3-record file
    (the pool of 3 minus itself); lm-eval would otherwise draw a test document as its own example."""
    recs = _read(data_file(BUNDLE, task))[:3]
    write_jsonl_gz(recs, data_file(tmp_path / "data", task))
    keys = split_keys(task, [EVAL_SPLIT[task]])
    assert keys["training_split"] is None and keys["validation_split"] == (None if task == "arc_easy" else "validation")
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(
        include_path=str(write_task_configs(tmp_path / "data", tmp_path / "y", [task])), include_defaults=False
    )
    t = get_task_dict([f"gptflow_{task}"], tm)[f"gptflow_{task}"]
    by_doc = {r[1]: r for r in requests(t, 2)}
    assert len(by_doc) == 3
    for _doc_id, (_, _, _, (ctx, _), doc, _, text) in by_doc.items():
        others = [t.doc_to_text(d) for d in t.eval_docs if d != doc]
        assert ctx.count(text) == 1 and all(o in ctx for o in others), ctx
