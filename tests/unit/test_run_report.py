"""The run report's pure parts (`tasks/report.py`, `tasks/report_render.py`) and `gptflow report` on a bad run id.
The report of a real pipeline run is checked in tests/e2e/test_pipeline_tiny.py."""

from __future__ import annotations

import base64
import re

from tasks.report import RunReport, funnel, post_curves, table_rows
from tasks.report_render import charts, render_html, render_markdown


def _report(**kw) -> RunReport:
    base = dict(run_id="r1", name="tiny-abc", status="FINISHED", started="2026-11-30 10:00 UTC", tags={},
                funnel=[], data_totals={}, tokenizer={}, model={}, losses={}, post_curves={}, eval_table="",
                eval_rows=[], promotion="", contamination="", timings=[])
    return RunReport(**(base | kw))


def test_funnel_keeps_the_steps_that_count_documents_in_order():
    counts = {"steps": {"filter/read_wet": {"in": 69, "kept": 67, "dropped": 2},
                        "exact_find/find": {"seconds": 0.1},  # a step that counts no documents
                        "filter/language": {"in": 67, "kept": 50}}}
    assert funnel(counts) == [{"step": "filter/read_wet", "in": 69, "kept": 67, "dropped": 2},
                              {"step": "filter/language", "in": 67, "kept": 50, "dropped": 17}]


def test_post_training_curves_come_from_each_stages_history_in_its_own_layout():
    histories = {"dpo": {"dpo": [[5, 0.1, -0.1, 0.2, 0.5], [10, 0.2, -0.2, 0.4, 0.75]]},  # step, chosen, rejected, margin, acc
                 "ppo": {"rollout": [{"step": 0, "reward": 0.17, "kl": 0.0}, {"step": 4, "reward": 0.01, "kl": 0.02}]},
                 "grpo": {"grpo": [{"step": 1, "grpo/accuracy": 0.5, "grpo/reward": 0.5, "grpo/kl": 0.0}]}}  # one point
    assert post_curves(histories) == {"dpo/margin": [[5, 0.2], [10, 0.4]], "dpo/reward_acc": [[5, 0.5], [10, 0.75]],
                                      "ppo/reward": [[0, 0.17], [4, 0.01]], "ppo/kl": [[0, 0.0], [4, 0.02]]}


def test_eval_table_rows_drop_the_bold_that_marks_the_best():
    md = "| benchmark | base | sft |\n|---|---:|---:|\n| arc_easy/acc | 0.2500 | **0.3000** |\n"
    assert table_rows(md) == [{"benchmark": "arc_easy/acc", "base": "0.2500", "sft": "0.3000"}]


def test_html_inlines_every_chart_and_links_nothing_outside(tmp_path):
    r = _report(losses={"pretrain": {"train": [[1, 7.6], [2, 7.1], [3, 6.9]], "val": [[3, 7.0]]}},
                post_curves={"ppo/reward": [[0, 0.1], [4, 0.2]]}, timings=[{"stage": "total", "seconds": 3.5,
                                                                            "cached": False}])
    made = charts(r, tmp_path / "images")
    assert set(made) == {"loss", "post_training"}
    md = render_markdown(r, {k: p.relative_to(tmp_path).as_posix() for k, p in made.items()})
    assert "![loss curves](images/loss.png)" in md and "| total | 3.5 |" in md
    html = render_html(md, tmp_path, "t")
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert [base64.b64decode(d) for d in inlined] == [made["loss"].read_bytes(), made["post_training"].read_bytes()]
    assert not re.findall(r'(?:src|href)="(?!data:)', html)


def test_report_of_an_unknown_run_is_one_line_and_status_2(sqlite_mlflow, capsys):
    from flows.cli import main

    assert main(["report", "no-such-run"]) == 2
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gptflow")]  # MLflow's INFO aside
    assert len(ours) == 1 and ours[0].startswith("gptflow: error: MLflow run no-such-run: not found"), ours
