"""Config, presets, overrides and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import main
from flows.config import PipelineConfig, apply_overrides, parse_sets, read_config_file
from flows.presets import PRESETS, resolve
from tasks.data import DataConfig
from tasks.stage import GptflowError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_hold_the_tokenizer_vocabulary(name):
    cfg = resolve(name)
    assert cfg.preset == name
    assert cfg.pretrain.model.vocab_size >= cfg.tokenizer.vocab_size


def test_dotted_overrides_change_exactly_one_field():
    base = resolve("tiny")
    cfg = resolve("tiny", {"pretrain.lr": 1e-4, "pretrain.model.n_layer": 3})
    assert cfg.pretrain.lr == 1e-4 and cfg.pretrain.model.n_layer == 3
    assert cfg.model_copy(update={"pretrain": base.pretrain}) == base


def test_unknown_key_names_the_key_and_what_exists():
    with pytest.raises(GptflowError, match=r"unknown config key 'pretrain\.lrr'.*known keys here:.*\blr\b"):
        resolve("tiny", {"pretrain.lrr": 1.0})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(GptflowError, match="unknown preset 'huge'.*tiny, small, gpt2-124m"):
        resolve("huge")


def test_bad_value_is_a_validation_error_naming_the_field():
    with pytest.raises(GptflowError, match="pretrain.steps"):
        resolve("tiny", {"pretrain.steps": -3})


def test_batch_tokens_sets_the_gradient_accumulation():
    gpt2 = resolve("gpt2-124m").pretrain  # GPT-3's 0.5M-token batch over 8 workers x 16 x 1024
    assert (gpt2.batch_tokens, gpt2.accum_steps, gpt2.tokens_per_step) == (524_288, 4, 524_288)
    fewer = resolve("gpt2-124m", {"pretrain.num_workers": 2}).pretrain  # same batch, more micro-batches
    assert (fewer.accum_steps, fewer.tokens_per_step) == (16, 524_288)
    tiny = resolve("tiny").pretrain
    assert tiny.batch_tokens is None and tiny.accum_steps == tiny.grad_accum
    with pytest.raises(GptflowError, match=r"batch_tokens \(524,288\) must be a multiple of .*3 \* 16 \* 1024 = 49,152"):
        resolve("gpt2-124m", {"pretrain.num_workers": 3})
    with pytest.raises(GptflowError, match="asks for 4 micro-batches per step but grad_accum is 2"):
        resolve("gpt2-124m", {"pretrain.grad_accum": 2})
    assert resolve("gpt2-124m", {"pretrain.grad_accum": 4}).pretrain.accum_steps == 4  # agreeing is fine


@pytest.mark.parametrize("item", ["pretrain.lr", "=3", "pretrain..lr=1", ""])
def test_malformed_set_is_rejected(item):
    with pytest.raises(GptflowError, match="malformed --set"):
        parse_sets([item])


def test_set_values_parse_as_json_or_string():
    assert parse_sets(["a=3", "b=3e-4", "c=true", 'd=["en","fr"]', "e=hello"]) == {
        "a": 3, "b": 3e-4, "c": True, "d": ["en", "fr"], "e": "hello"}


def test_config_file_nested_and_dotted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  lr: 0.002\n  model:\n    n_layer: 3\nsft.steps: 7\n")
    over = read_config_file(f)
    assert over == {"pretrain.lr": 0.002, "pretrain.model.n_layer": 3, "sft.steps": 7}
    cfg = resolve("tiny", over)
    assert (cfg.pretrain.lr, cfg.pretrain.model.n_layer, cfg.sft.steps) == (0.002, 3, 7)


def test_config_file_keeps_mapping_values_whole(tmp_path):
    """data.text_sources maps file paths (with dots) to weights: one value, not more sections to open."""
    f = tmp_path / "c.yaml"
    f.write_text('data:\n  text_sources: {"data/text/c4_demo.jsonl.gz": 0.5}\npretrain:\n  model:\n    n_layer: 3\n')
    over = read_config_file(f, PipelineConfig)
    assert over == {"data.text_sources": {"data/text/c4_demo.jsonl.gz": 0.5}, "pretrain.model.n_layer": 3}
    cfg = resolve("tiny", over)
    assert cfg.data.text_sources == {"data/text/c4_demo.jsonl.gz": 0.5} and cfg.pretrain.model.n_layer == 3
    stage = tmp_path / "data.yaml"  # a stage command's file: keys of that stage's config
    stage.write_text('text_sources: {"data/text/c4_demo.jsonl.gz": 0.25}\n')
    assert read_config_file(stage, DataConfig) == {"text_sources": {"data/text/c4_demo.jsonl.gz": 0.25}}


def test_apply_overrides_does_not_touch_the_base():
    base = {"a": {"b": 1}}
    assert apply_overrides(base, {"a.b": 2}) == {"a": {"b": 2}} and base == {"a": {"b": 1}}


@pytest.mark.parametrize("argv, message", [
    (["run", "--preset", "huge"], "unknown preset 'huge'"),
    (["run", "--set", "pretrain.lr"], "malformed --set 'pretrain.lr'"),
    (["run", "--set", "pretrain.nope=1"], "unknown config key 'pretrain.nope'"),
    (["run", "--config", "no/such/file.yaml"], "config file does not exist: no/such/file.yaml"),
    (["tokenizer", "--input", "no/such/corpus"], "corpus does not exist: no/such/corpus"),
    (["data", "--input", "no/such.warc.gz"], "input path does not exist: no/such.warc.gz"),
    (["sft", "--model", "no/model", "--tokenizer", "no/tok"], "model folder does not exist: no/model"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"gptflow: error: {message}" in err
    assert "Traceback" not in err


def test_cli_error_in_a_real_process_has_no_traceback():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "gptflow: error: unknown preset 'nope'; choose one of: tiny, small, gpt2-124m, shakespeare")
    assert "Traceback" not in out.stderr


def test_cli_output_into_a_closed_pipe_stops_quietly():
    """`gptflow plan ... | head -0`: the reader is gone before the plan is printed; no traceback, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "plan", "--preset", "gpt3-175b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the CLI has even parsed its arguments
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["run", "--set", "pretrain.steps=5", "--print-config"]) == 0
    assert '"steps": 5' in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "data", "tokenizer", "pretrain", "sft", "dpo", "ppo", "eval", "export", "import", "plan"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert {"plan": "--mfu", "import": "--out"}.get(command, "--set") in capsys.readouterr().out


def test_plan_reproduces_the_gpt3_seed_figures(capsys):
    assert main(["plan", "--preset", "gpt3-175b"]) == 0
    out = capsys.readouterr().out
    assert "weights in matrices   175,181,291,520" in out
    assert "embedding 617,558,016" in out
    assert out.count("14,495,514,624") == 4
    assert "a 7B model needs 84 GB" in out


def test_plan_of_a_pipeline_preset_and_bad_preset(capsys):
    assert main(["plan", "--preset", "tiny"]) == 0
    assert "plan for tiny: llama" in capsys.readouterr().out
    assert main(["plan", "--preset", "gpt5"]) == 2
    assert "unknown preset 'gpt5'" in capsys.readouterr().err


def test_the_data_cli_and_the_stage_flows_import_no_torch():
    """`gptflow data` (configs, presets, the flows and the data core) starts without torch's seconds of import;
    the training cores import it inside their tasks."""
    code = ("import sys; from flows import cli, stages; from flows.presets import resolve; from tasks import data; "
            "resolve('gpt2-124m'); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_registered_model_is_named_after_the_preset_unless_set(name):
    assert resolve(name).registration.model_name == f"gpt-{name}"
    assert resolve(name, {"registry.model_name": "my-gpt"}).registration.model_name == "my-gpt"
    assert resolve(name).registry.model_name is None  # not baked into the config a run logs


def test_plan_takes_every_gpu_of_the_one_peak_table(capsys):
    from models.plan import PEAK_BF16_FLOPS

    for gpu in PEAK_BF16_FLOPS:
        assert main(["plan", "--preset", "tiny", "--gpu", gpu]) == 0
        assert f"x {gpu.upper()} at" in capsys.readouterr().out
    assert main(["plan", "--preset", "tiny", "--gpu", "tpu"]) == 2
    assert "unknown --gpu 'tpu'; choose one of: h100" in capsys.readouterr().err
