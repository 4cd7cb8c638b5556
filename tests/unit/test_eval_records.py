"""Bad benchmark input fails before any scoring, with one line naming the file, the record or the task
(eval/records.py, eval/taskgen.py, eval/prepare.py --fewshot-src).

Run: python -m pytest tests/unit/test_eval_records.py -x -q
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from eval import prepare
from eval.benchmarks import TASKS, data_file, split_file
from eval.convert import BenchmarkDataError
from eval.records import check_file
from eval.taskgen import write_task_configs

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "data" / "benchmarks"


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write(path: Path, records: list[dict] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = records if isinstance(records, str) else "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def _folder_with(tmp_path: Path, task: str, records: list[dict] | str) -> Path:
    """A data folder with the bundle's files for every task but `task`, whose file holds `records`."""
    data = tmp_path / "data"
    data.mkdir()
    for t in TASKS:
        shutil.copy(data_file(BUNDLE, t), data_file(data, t))
    _write(data_file(data, task), records)
    return data


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_bundle_passes_the_checks():
    assert {t: check_file(t, data_file(BUNDLE, t)) for t in TASKS} == {**{t: 200 for t in TASKS}, "wikitext": 5}


def test_file_in_another_tasks_layout_names_file_record_and_layout(tmp_path):
    hellaswag = _read(data_file(BUNDLE, "hellaswag"))[:3]
    data = _folder_with(tmp_path, "winogrande", hellaswag)
    with pytest.raises(BenchmarkDataError) as err:
        write_task_configs(data, tmp_path / "yaml", ["core"])
    msg = _one_line(err)
    assert str(data_file(data, "winogrande")) in msg and "record 0" in msg
    assert "not a winogrande record" in msg and "hellaswag's layout" in msg
    assert not (tmp_path / "yaml").exists()  # nothing rendered


def test_record_missing_a_field_names_record_and_field(tmp_path):
    recs = _read(data_file(BUNDLE, "arc_easy"))[:5]
    del recs[3]["answerKey"]
    data = _folder_with(tmp_path, "arc_easy", recs)
    with pytest.raises(BenchmarkDataError) as err:
        write_task_configs(data, tmp_path / "yaml", ["arc_easy"])
    msg = _one_line(err)
    assert "arc_easy.jsonl.gz record 3 (line 4)" in msg and "['answerKey']" in msg


@pytest.mark.parametrize(
    ("task", "edit", "why"),
    [
        ("winogrande", {"sentence": "no blank here"}, "no '_' blank"),
        ("winogrande", {"answer": 2}, "answer 2 is not '1' or '2'"),
        ("hellaswag", {"label": "7"}, "label '7' is not an index into endings"),
        ("openbookqa", {"answerKey": "Z"}, "answerKey 'Z' is not one of"),
    ],
)
def test_values_lm_eval_cannot_use_are_named(tmp_path, task, edit, why):
    recs = _read(data_file(BUNDLE, task))[:2]
    recs[1].update(edit)
    with pytest.raises(BenchmarkDataError, match=f"record 1 .*{why}") as err:
        check_file(task, _write(tmp_path / f"{task}.jsonl.gz", recs))
    _one_line(err)


def test_empty_file_and_non_json_line(tmp_path):
    with pytest.raises(BenchmarkDataError, match=r"boolq\.jsonl\.gz: no records .*'boolq'") as err:
        check_file("boolq", _write(tmp_path / "boolq.jsonl.gz", "\n"))
    _one_line(err)
    with pytest.raises(BenchmarkDataError, match=r"piqa\.jsonl\.gz:2: not valid JSON"):
        check_file(
            "piqa", _write(tmp_path / "piqa.jsonl.gz", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{oops\n')
        )


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mmlu'; known: hellaswag, arc_easy, .*wikitext") as err:
        write_task_configs(BUNDLE, tmp_path / "yaml", ["piqa", "mmlu"])
    _one_line(err)
    with pytest.raises(ValueError, match="unknown benchmark task 'mmlu'"):
        check_file("mmlu", data_file(BUNDLE, "piqa"))


def test_bad_fewshot_split_file_is_named_too(tmp_path):
    data = _folder_with(tmp_path, "piqa", _read(data_file(BUNDLE, "piqa")))
    _write(split_file(data, "piqa", "train"), [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(BenchmarkDataError, match=r"piqa\.train\.jsonl\.gz record 0 .*\['sol2'\]"):
        write_task_configs(data, tmp_path / "yaml", ["piqa"])


def test_bad_data_stops_run_benchmarks_before_the_model_is_loaded(tmp_path):
    from eval.harness import run_benchmarks

    data = _folder_with(tmp_path, "lambada_openai", [{"context": "a b", "continuation": "c"}])
    with pytest.raises(BenchmarkDataError, match=r"lambada_openai\.jsonl\.gz record 0"):
        run_benchmarks(tmp_path / "no-model", tmp_path / "no-tokenizer.json", ["core"], 2, data, tmp_path / "out")


def test_prepare_fewshot_src_copies_checked_hf_splits(tmp_path):
    """`--fewshot-src` adds `<task>.<split>.jsonl.gz` for splits the task declares, listed in MANIFEST.json;
    taskgen then points the task's own training split at it."""
    src, fs, out = tmp_path / "src", tmp_path / "fs", tmp_path / "out"
    piqa = [{"query": f"Question: goal {i}\n", "choices": ["x", "y"], "gold": i % 2} for i in range(5)]
    _write(src / "benchmarks" / "piqa.jsonl.gz", piqa)  # llm-foundry layout, as in the shared data
    train = [{"goal": f"train goal {i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(6)]
    fs.mkdir()
    (fs / "piqa.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (fs / "piqa.unknown.jsonl").write_text("not even json\n")  # a split piqa's YAML does not declare: ignored
    manifest = prepare.prepare_benchmarks(src, out, limit=4, tasks=["piqa"], fewshot_src=fs)
    assert manifest["piqa"]["split"] == "validation" and manifest["piqa"]["count"] == 4
    entry = manifest["piqa"]["splits"]["train"]
    assert list(manifest["piqa"]["splits"]) == ["train"]
    assert (entry["file"], entry["source"], entry["count"]) == ("piqa.train.jsonl.gz", "piqa.train.jsonl", 6)
    assert _read(split_file(out, "piqa", "train")) == train
    assert json.loads((out / "MANIFEST.json").read_text())["piqa"]["splits"]["train"]["count"] == 6
    rendered = (write_task_configs(out, tmp_path / "yaml", ["piqa"]) / "gptflow_piqa.yaml").read_text()
    assert "training_split: train\n" in rendered and "piqa.train.jsonl.gz" in rendered

    (fs / "piqa.train.jsonl").write_text(json.dumps({"goal": "g"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"piqa\.train\.jsonl record 0 .*missing"):
        prepare.prepare_benchmarks(src, tmp_path / "out2", limit=4, tasks=["piqa"], fewshot_src=fs)


def test_a_model_whose_vocabulary_does_not_match_its_tokenizer_is_named_before_scoring(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from eval.harness import run_benchmarks
    from infra.env import DATA_DIR
    from models.checkpoint import save_model
    from models.config import GPTConfig
    from models.gpt import GPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["some text to learn a few merges from"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))  # 256 bytes + merges + 1: more than the model's 64
    save_model(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)), tmp_path / "model")
    with pytest.raises(ValueError) as err:
        run_benchmarks(tmp_path / "model", tmp_path / "tokenizer.json", ["arc_easy"], 2,
                       DATA_DIR / "benchmarks", tmp_path / "out")
    line = _one_line(err)
    assert str(tmp_path / "tokenizer.json") in line and str(tmp_path / "model") in line and "vocab_size 64" in line
    assert not (tmp_path / "out" / "results.json").exists()
