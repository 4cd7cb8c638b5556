"""Publish a pipeline run's report (`tasks/report.py`): files on disk, `report.md` and `report.html` on the parent
MLflow run, a Prefect Markdown artifact (`run-report`) and a table artifact of the eval results (`eval-results`)
on the flow run, so the Prefect UI's run page tells the story."""

from __future__ import annotations

import re
from pathlib import Path

from tasks import tracking
from tasks.report import RunReport, collect, environment
from tasks.report_render import write_report

REPORT_KEY = "run-report"
EVAL_KEY = "eval-results"


def build_report(run_id: str, out_dir: Path) -> tuple[RunReport, Path, Path]:
    """Collect the run's records and write report.md (+ images/) and report.html into `out_dir`."""
    report = collect(run_id)
    chart = tracking.download_artifact(run_id, "results.png", out_dir / "downloads")
    md, html = write_report(report, out_dir, chart)
    return report, md, html


def publish_report(run_id: str, out_dir: Path) -> Path:
    """At the end of a pipeline run (inside its flow): record this machine's environment on the run, build the
    report from the run's records, log it to the run and publish it to Prefect. Returns the HTML file's path."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    tracking.log_dict(run_id, environment(), "environment.json")
    report, md, html = build_report(run_id, out_dir)
    tracking.log_artifact(run_id, md)
    tracking.log_artifact(run_id, html)
    tracking.log_artifact(run_id, out_dir / "images", "report_images")
    # Prefect's page cannot show the charts' files: name them where they are (on the MLflow run, inlined in the HTML)
    text = re.sub(r"!\[([^\]]*)\]\(images/([^)]+)\)", r"*\1: `report_images/\2` on the MLflow run*", md.read_text())
    create_markdown_artifact(markdown=text + f"\n\nFull report with charts: `report.html` on MLflow run `{run_id}`, "
                             f"and `{html}`.\n", key=REPORT_KEY, description=f"Run report of MLflow run {run_id}")
    if report.eval_rows:
        create_table_artifact(table=report.eval_rows, key=EVAL_KEY, description="Eval results of every model of the run")
    return html
