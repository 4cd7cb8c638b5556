"""Data stage: raw Common Crawl WARC/WET (plus clean JSONL text sources) in, clean English documents out.

In:   `DataConfig.inputs` (WARC files: HTML extracted with Trafilatura; WET files: text used as is; local paths,
      fsspec URLs or Common Crawl `*.paths.gz` listings) and `DataConfig.text_sources` (JSONL files with a "text"
      field, mixed in with a sampling weight); `crawl_inputs(cfg)` finds them all once, as `InputRef`s.
Out:  a `CorpusRef` to `<out_dir>/documents/*.jsonl.gz` (JSONL: text, id, metadata {source, url, file_path,
      language, language_score}; datatrove's JsonlReader and `datasets.load_dataset("json", ...)` read it), with
      `removed/<step>/` (what each filter dropped, for audit), `logs/<run>/` (datatrove logs, per-task stats and
      completion markers), `summary.json` (the counts), `funnel.png` and `samples/`.
Steps, all datatrove blocks: read -> Trafilatura (WARC only) -> [source sampling] -> fastText language ID ->
      Gopher repetition -> Gopher quality -> C4 quality -> C4 bad words -> exact dedup -> MinHash dedup ->
      C4 three-sentence span dedup -> PII masking; planned in `plan.py` as datatrove runs, run by `execute.py`
      on the local executor or Ray, counted by `counts.py`. A rerun skips the tasks a previous run completed.
Run alone: `.venv/bin/python -m tasks.data [OUT_DIR]`. Workers start through a forkserver, so a script that calls
`build_corpus` needs the usual `if __name__ == "__main__":` guard (without it every worker re-runs the script).

Modules: config (DataConfig), inputs (listings, checks, `crawl_inputs`), plan, execute, counts, blocks (our
datatrove blocks), report (mix, funnel chart, samples, output readers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tasks.data.config import ARCHIVE_ORG_CRAWL, BUNDLED_CRAWL, CRAWL_SOURCE, DataConfig
from tasks.data.counts import DataInvariantError
from tasks.data.execute import run_all, seed_offline_assets, start_local_workers, uses_ray
from tasks.data.inputs import check_input, crawl_inputs, is_listing, resolve_path, sized_inputs
from tasks.data.plan import plan_runs
from tasks.data.report import funnel_chart, iter_documents, iter_records, realised_mix, write_samples
from tasks.refs import CorpusRef, InputRef
from tasks.stage import is_url

__all__ = [
    "ARCHIVE_ORG_CRAWL", "BUNDLED_CRAWL", "CRAWL_SOURCE", "DataConfig", "DataInvariantError", "build_corpus",
    "check_input", "crawl_inputs", "iter_documents", "iter_records", "uses_ray", "warm_up",
]


def claim_folder(cfg: DataConfig, out_dir: Path) -> None:
    """Make `out_dir` this config's: refuse one that holds another config's run, then write `config.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != cfg.model_dump(mode="json"):
        raise ValueError(
            f"{out_dir} holds a run of a different config; use a fresh folder (e.g. one per cfg.fingerprint())"
        )
    config_file.write_text(cfg.model_dump_json(indent=2))


def corpus_counts(cfg: DataConfig, steps: dict[str, Any], written: int | None, skipped: list[str],
                  documents: Path, seconds: float) -> dict[str, Any]:
    """The stage's counts: every step's, the totals, the realised mix, the damaged files and the skipped runs."""
    mix = realised_mix(cfg.text_sources, documents)
    readers = [c for k, c in steps.items() if k.startswith("filter/") and c["kind"] == "reader"]
    docs_out = sum(m["docs"] for m in mix.values())
    if docs_out != written:
        raise DataInvariantError(f"{documents} holds {docs_out} documents but the last run wrote {written}")
    totals = {
        "records_in": sum(c["in"] for c in readers),
        "docs_in": sum(c["kept"] for c in readers),
        "docs_out": docs_out,
        "chars_out": sum(m["chars"] for m in mix.values()),
        "seconds": seconds,
    }
    return {
        "steps": steps,
        "totals": totals,
        "mix": mix,
        "corrupt_files": sorted({f for c in readers for f in c["corrupt_files"]}),
        "skipped_stages": skipped,
    }


def build_corpus(cfg: DataConfig, inputs: dict[str, InputRef], out_dir: Path) -> CorpusRef:
    """Run the data stage into `out_dir`; rerunning into the same folder resumes (finished tasks are skipped).

    Args:
        cfg: the stage config.
        inputs: `crawl_inputs(cfg)`: the files to read (listings expanded, every file checked) with their sizes.
        out_dir: output folder; must be empty or hold a run of the same config.

    Returns:
        A `CorpusRef` to `documents/`, with counts {"steps": {"<run>/<step>": {in, kept, dropped,
        dropped_by_reason, ...}}, "totals": {...}, "mix": {source: {docs, chars, doc_share, char_share, weight}},
        "corrupt_files": [...], "skipped_stages": [...]} and files documents, removed, logs, summary, funnel, samples.
    """
    out_dir = Path(out_dir).resolve()
    claim_folder(cfg, out_dir)
    seed_offline_assets()
    t0 = time.perf_counter()
    steps, written, skipped = run_all(plan_runs(cfg, inputs, out_dir), out_dir, cfg.workers, uses_ray(cfg))
    documents = out_dir / "documents"
    documents.mkdir(exist_ok=True)
    counts = corpus_counts(cfg, steps, written, skipped, documents, round(time.perf_counter() - t0, 2))
    files = {name: str(out_dir / name) for name in ("documents", "removed", "logs")}
    files |= {"summary": str(out_dir / "summary.json"), "funnel": str(out_dir / "funnel.png"),
              "samples": str(out_dir / "samples")}
    funnel_chart(steps, Path(files["funnel"]))
    write_samples(out_dir)
    (out_dir / "summary.json").write_text(json.dumps({"counts": counts, "outputs": files}, indent=2))
    return CorpusRef(path=files["documents"], counts=counts, files=files, artifacts=["funnel", "samples"])


def warm_up(cfg: DataConfig) -> None:
    """The stage's start-up that needs neither Prefect nor MLflow, for the CLI to do while its Prefect server
    starts: the local workers' forkserver (which imports their modules once), the offline assets, the funnel
    chart's matplotlib, and a dry run of `plan_runs` into a throwaway folder, which imports the blocks and fills
    datatrove's caches. The dry run is skipped unless every input is a local file: planning sizes the inputs, and
    remote ones cost requests; problems with inputs are `crawl_inputs`'s to report."""
    import tempfile

    import matplotlib

    if not uses_ray(cfg):
        start_local_workers()
    seed_offline_assets()
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    paths = [*cfg.inputs, *cfg.text_sources]
    if all(not is_url(p) and not is_listing(p) and Path(resolve_path(p)).is_file() for p in paths):
        with tempfile.TemporaryDirectory(prefix="gptflow-plan-") as tmp:
            plan_runs(cfg, sized_inputs(cfg), Path(tmp))
