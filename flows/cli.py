"""`gptflow`: run the pipeline, or one stage alone, from the command line.

    gptflow run --preset tiny [--config FILE] [--set key=value ...]
    gptflow data [--input PATH ...] [--set key=value ...]
    gptflow tokenizer --input CORPUS
    gptflow pretrain --input SHARDS_DIR
    gptflow sft|reward|dpo|grpo|eval|classify --model MODEL [--tokenizer TOKENIZER_DIR]
    gptflow ppo --model SFT_MODEL --reward-model RM_DIR [--tokenizer TOKENIZER_DIR]
    gptflow chat --model MODEL [--system TEXT] [--temperature T] ...
    gptflow export --model MODEL_DIR --tokenizer TOKENIZER_DIR --out DIR
    gptflow serve prefect|mlflow|ray|worker|all|status|stop [NAME] [--host H] [--port N]
    gptflow report RUN_ID [--out DIR]

Errors the user can fix (unknown preset or key, malformed --set, missing input) are printed as one line,
without a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from infra.env import resolve_path, setup_env
from infra.startup import freeze_heap

STAGES = ("data", "tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "grpo", "eval", "classify")
ALIGN_STAGES = ("reward", "dpo", "ppo", "grpo")  # their configs live in the pipeline config's `align` section
EPILOG = "Keys for --set are dotted paths into the config, e.g. pretrain.lr=3e-4 or data.languages='[\"en\",\"fr\"]'."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptflow", description="Raw web crawl in; an evaluated, aligned GPT out, tracked in MLflow.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, preset_help: str) -> None:
        sp.add_argument("--preset", default="tiny", help=preset_help + " (tiny, small, gpt2-124m, shakespeare; default: tiny)")
        sp.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys (nested or dotted), applied before --set")
        sp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable; values parse as JSON when they can")
        sp.add_argument("--workdir", metavar="DIR", help="where stage folders go (default: $GPTFLOW_HOME/runs)")
        sp.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")

    run = sub.add_parser("run", help="run the whole pipeline", epilog=EPILOG,
                         description="Run data, tokenizer, pretrain, SFT, alignment, eval and registration as one Prefect flow.")
    common(run, "the preset to start from")
    run.add_argument("--result-json", metavar="FILE",
                     help="also write the run's result as JSON (MLflow run id, models, gate decision, stage times and "
                          "cache hits, stage folders) for scripts")

    data = sub.add_parser("data", help="Common Crawl WARC/WET -> clean JSONL documents", epilog=EPILOG,
                          description="Run the data stage alone. Keys for --set are relative to the data config (e.g. languages).")
    common(data, "preset whose data config is the base")
    data.add_argument("--input", nargs="+", metavar="PATH",
                      help="WARC/WET files or crawl listings (warc.paths.gz), local or URLs (replaces data.inputs)")

    tok = sub.add_parser("tokenizer", help="train the BPE tokenizer and write token shards", epilog=EPILOG,
                         description="Run the tokenizer stage alone on a folder or file of JSONL/text documents.")
    common(tok, "preset whose tokenizer config is the base")
    tok.add_argument("--input", required=True, metavar="CORPUS", help="folder or file of .jsonl(.gz)/.txt documents")

    pre = sub.add_parser("pretrain", help="pretrain the GPT on token shards with Ray Train", epilog=EPILOG,
                         description="Run the pretraining stage alone on a shards folder (with index.json).")
    common(pre, "preset whose pretrain config is the base")
    pre.add_argument("--input", required=True, metavar="SHARDS_DIR", help="shards folder from the tokenizer stage")

    for name, what in (("sft", "supervised fine-tuning on chat data"),
                       ("reward", "a reward model (Bradley-Terry) on ranked reply pairs, registered in MLflow"),
                       ("dpo", "DPO on preference pairs"),
                       ("ppo", "PPO against a reward model, with a KL penalty to the SFT model (InstructGPT)"),
                       ("grpo", "GRPO with a verifiable reward (generated arithmetic prompts)"),
                       ("eval", "lm-eval benchmarks from local files"), ("export", "export to Hugging Face format"),
                       ("classify", "GPT-1 task fine-tuning: a yes/no head on BoolQ")):
        sp = sub.add_parser(name, help=what, epilog=EPILOG, description=f"Run the {name} stage alone: {what}.")
        common(sp, f"preset whose {name} config is the base")
        if name == "export":
            sp.add_argument("--model", required=True, metavar="MODEL_DIR", help="folder with model.safetensors and config.json")
        else:
            sp.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
        sp.add_argument("--tokenizer", required=name == "export", metavar="TOKENIZER_DIR",
                        help="folder with tokenizer.json" + ("" if name == "export" else " (default: the model's own)"))
        if name == "export":
            sp.add_argument("--out", required=True, metavar="DIR", help="output folder for the Hugging Face model")
        if name == "ppo":
            sp.add_argument("--reward-model", metavar="RM_DIR",
                            help="reward model folder from the reward stage (omit only with --set reward_token=TOKEN, a toy reward)")
    imp = sub.add_parser("import", help="import a Hugging Face GPT-2 or Llama folder as our model",
                         description="Turn a Hugging Face GPT2LMHeadModel or LlamaForCausalLM folder (config.json and "
                                     "safetensors; pickles are refused) into our model folder, the base for sft and the alignment stages.")
    imp.add_argument("--model", required=True, metavar="HF_DIR", help="Hugging Face model folder")
    imp.add_argument("--out", required=True, metavar="DIR", help="output folder (model.safetensors + config.json)")
    add_chat_parser(sub)
    add_serve_parser(sub)
    rep = sub.add_parser("report", help="build the run report (Markdown + self-contained HTML) of a pipeline run",
                         description="Build the report of an existing pipeline run from its MLflow records: data "
                                     "funnel, tokenizer, model size and compute, curves, evals, timings, environment.")
    rep.add_argument("run_id", metavar="RUN_ID", help="the pipeline's parent MLflow run id (printed by `gptflow run`)")
    rep.add_argument("--out", metavar="DIR", help="output folder (default: $GPTFLOW_HOME/reports/RUN_ID)")
    plan = sub.add_parser("plan", help="parameters, FLOPs, memory and time of a model, from its config",
                          description="Plan a training run: parameters, FLOPs (6ND plus attention), memory per device, "
                                      "Chinchilla-optimal tokens and time at a given MFU. Nothing is trained.")
    plan.add_argument("--preset", default="tiny", help="tiny, small, gpt2-124m, or the planning-only gpt3-175b, llama2-7b")
    plan.add_argument("--tokens", type=float, help="training tokens (default: a pipeline preset's schedule, steps x tokens per step; else Chinchilla-optimal, 20 per parameter)")
    plan.add_argument("--gpu", default="h100", help="GPU whose dense bf16 peak sets the time: h100, h200, a100, l4, a10g")
    plan.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to assume (default 0.4)")
    plan.add_argument("--price-per-hour", type=float, help="price of one GPU-hour, for the cost line")
    return p


MODEL_HELP = ("our model folder (model.safetensors + config.json), a Hugging Face GPT-2/Llama folder (imported once "
              "into the workspace), or a registered model: models:/NAME@ALIAS or models:/NAME/VERSION")


# The rule `tasks/chat_session.py` applies (not imported here: `gptflow --help` should not load tokenizers).
CUT_RULE = ("the answer always has room for min(--max-tokens, block_size/2) tokens of the model's context: while "
            "the conversation leaves less, its oldest turns are dropped (the system prompt is kept)")


def add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a model in the terminal, answers streamed as they are sampled",
                          description="A multi-turn conversation in the chat template the model was fine-tuned on.",
                          epilog=f"Commands: /reset starts a new conversation; /quit or Ctrl-D ends; Ctrl-C stops an "
                                 f"answer. Context: {CUT_RULE}. Turn n samples with seed S+n.")
    chat.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    chat.add_argument("--tokenizer", metavar="TOKENIZER_DIR", help="folder with tokenizer.json (default: the model's own)")
    chat.add_argument("--system", metavar="TEXT", help="system prompt, kept at the start of every conversation")
    chat.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    chat.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all (default 50)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    chat.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    chat.add_argument("--seed", type=int, help="seed for repeatable sampling (default: fresh randomness)")


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="start, check or stop the servers: Prefect (UI), MLflow, a Ray head, a worker",
                           description="Start a server detached, with its state in $GPTFLOW_HOME/services/<name>/; "
                                       "the command returns once it answers and prints the URL to open and the "
                                       "variable to export. A second start of a running server prints its URL.")
    serve.add_argument("action", choices=("prefect", "mlflow", "ray", "worker", "all", "status", "stop"), metavar="ACTION",
                       help="prefect, mlflow, ray or worker: start one; all: the four in order; status; stop")
    serve.add_argument("name", nargs="?", default="all", choices=("prefect", "mlflow", "ray", "worker", "all"),
                       metavar="NAME", help="with stop: which service (default: all, in reverse order)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, help="port (defaults: Prefect 4200, MLflow 5000, Ray 6379)")
    serve.add_argument("--backend-store-uri", metavar="URI",
                       help="MLflow's store (default: sqlite in $GPTFLOW_HOME/services/mlflow/)")
    serve.add_argument("--artifacts-destination", metavar="URI",
                       help="where MLflow keeps artifacts, served through the server (default: the workspace)")
    serve.add_argument("--pool", default="gptflow", help="the worker's Prefect work pool, created if missing (default gptflow)")


def cmd_serve(args: argparse.Namespace) -> int:
    from infra import services
    from tasks.stage import GptflowError

    try:
        if args.action == "status":
            print("\n".join(services.status()))
        elif args.action == "stop":
            for name in reversed(services.SERVICES) if args.name == "all" else [args.name]:
                services.stop(name)
        elif args.action == "all":
            if args.port is not None:
                raise GptflowError("--port applies to one service: `gptflow serve prefect --port N`")
            services.start_all(args.host, None, None, args.backend_store_uri, args.artifacts_destination, args.pool)
        else:
            services.start(args.action, args.host, args.port, None, args.backend_store_uri, args.artifacts_destination,
                           args.pool)
    except services.ServiceError as e:
        raise GptflowError(str(e)) from e
    return 0


def model_source(args: argparse.Namespace) -> tuple[str, str]:
    """--model (any source `tasks.model_source` takes) and --tokenizer as folders; a tokenizer is required."""
    from tasks.model_source import resolve_model
    from tasks.stage import GptflowError

    model, tok = resolve_model(args.model, args.tokenizer)
    if tok is None:
        raise GptflowError(f"no tokenizer.json comes with {args.model}: pass --tokenizer DIR")
    return str(model), str(tok)


def cmd_chat(args: argparse.Namespace) -> int:
    from flows.chat import chat
    from models.checkpoint import load_model
    from tasks.bpe import load_tokenizer
    from tasks.chat_session import Sampling, check_chat_tokenizer
    from tasks.stage import GptflowError

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1 or args.top_k < 0:
        raise GptflowError("--temperature and --top-k must be >= 0, --top-p in (0, 1], --max-tokens >= 1")
    model_dir, tok_dir = model_source(args)
    opts = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                    top_p=args.top_p, seed=args.seed)
    model, tok = load_model(model_dir).eval(), load_tokenizer(tok_dir)
    check_chat_tokenizer(tok, model.config.vocab_size, tok_dir)
    chat(model, tok, opts, system=args.system)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from flows.plan import GPUS, render_plan
    from tasks.stage import GptflowError

    if not 0 < args.mfu <= 1 or args.gpus < 1:
        raise GptflowError("--mfu must be in (0, 1] and --gpus at least 1")
    if args.gpu.lower() not in GPUS:
        raise GptflowError(f"unknown --gpu '{args.gpu}'; choose one of: {', '.join(GPUS)}")
    args.gpu = args.gpu.lower()
    print(render_plan(args.preset, int(args.tokens) if args.tokens else None, args.gpu, args.mfu, args.gpus,
                      args.price_per_hour))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import build_report
    from infra.env import workspace
    from tasks import tracking
    from tasks.stage import GptflowError

    tracking.set_experiment()
    try:
        _, md, html = build_report(args.run_id, Path(args.out) if args.out else workspace() / "reports" / args.run_id)
    except ValueError as e:
        raise GptflowError(str(e)) from e
    print(f"run report: {md}\n            {html}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from models.hf_import import import_hf
    from tasks.stage import GptflowError

    try:
        out = import_hf(Path(require(args.model, "Hugging Face model folder")), Path(args.out))
    except ValueError as e:  # an unsupported config, unmapped weights, a pickle: one line naming the file
        raise GptflowError(str(e)) from e
    print(f"imported {args.model} as our model in {out}")
    return 0


def overrides_from(args: argparse.Namespace, model: type | None = None) -> dict[str, Any]:
    """--config FILE (keys of `model`: the stage's config, or the whole pipeline's) and then --set KEY=VALUE."""
    from flows.config import parse_sets, read_config_file

    out: dict[str, Any] = {}
    if args.config:
        if not resolve_path(args.config).is_file():
            from tasks.stage import GptflowError

            raise GptflowError(f"config file does not exist: {args.config}")
        out = read_config_file(resolve_path(args.config), model)
    out.update(parse_sets(args.sets))
    return out


def stage_config(args: argparse.Namespace, stage: str):
    """The stage's config from the preset, with --config/--set keys relative to the stage."""
    from flows.config import PipelineConfig, apply_overrides, validate
    from flows.presets import resolve
    from tasks.align import AlignConfig

    base = resolve(args.preset)
    holder, fields = (base.align, AlignConfig.model_fields) if stage in ALIGN_STAGES else (base, PipelineConfig.model_fields)
    section = getattr(holder, stage).model_dump(mode="json")
    field = fields[stage].annotation
    section = apply_overrides(section, overrides_from(args, field), where=f"{stage} config")
    return validate(field, section, f"{stage} config")


def require(path: str, what: str) -> str:
    from tasks.stage import GptflowError

    p = resolve_path(path)
    if not p.exists():
        raise GptflowError(f"{what} does not exist: {path}")
    return str(p)


def data_input(path: str) -> str:
    """A data `--input`: a local path must exist; a URL (a crawl file or a listing) must answer, so that a typo or
    an unreachable host is one line here rather than a failed flow. The stage checks every file again."""
    from tasks.data.config import check_location
    from tasks.stage import GptflowError, is_url

    try:
        check_location("--input", path)  # the scheme and no credentials in the URL, as the config's validator does
    except ValueError as e:
        raise GptflowError(str(e)) from e
    if not is_url(path):
        return require(path, "input path")
    from tasks.data import check_input

    try:
        check_input(path)
    except (OSError, ValueError) as e:  # not found, unreachable, a WAT file
        raise GptflowError(str(e)) from e
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from flows.config import PipelineConfig
    from flows.presets import resolve

    overrides = overrides_from(args, PipelineConfig)
    cfg = resolve(args.preset, overrides)  # validate before Prefect starts: errors stay one line
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    start_prefect(args)
    from flows.pipeline import llm_pipeline_flow

    result = run_flow(args, llm_pipeline_flow, preset=args.preset, overrides=overrides, workdir=args.workdir)
    print_summary(result)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def print_summary(r: dict[str, Any]) -> None:
    print("\n=== gptflow pipeline finished ===")
    print(f"MLflow run:       {r['run_id']} (experiment '{r['experiment']}', tracking URI {r['tracking_uri']})")
    for reg in r["models"].values():
        print(f"Registered model: {reg['name']} version {reg['version']}  ->  "
              + ", ".join(f"models:/{reg['name']}@{a}" for a in reg["aliases"])
              + ("  (the same weights: no new version)" if reg.get("reused") else ""))
    d, m = r["decision"], r["model"]
    print(f"Eval gate:        {d['method']} (version {m['version']}) is the candidate: {d['outcome']}, {d['reason']}"
          f"  ->  models:/{m['name']}@champion")
    print("Stage times (s):  " + ", ".join(f"{k} {v:.1f}" + (" (cached)" if r["cached"].get(k) else "")
                                          for k, v in r["times"].items()))
    print(f"Stage folders:    {Path(r['stage_dirs']['sft']).parent.parent}")
    if r.get("report"):
        print(f"Run report:       {r['report']} (also report.md/.html on the MLflow run, `run-report` in Prefect)")
    print(f"Browse:           mlflow ui --backend-store-uri {r['tracking_uri']} --host 127.0.0.1")
    print("\nEval results, side by side (results.md and results.png on the MLflow run; contamination.md beside them):\n"
          + r["eval_table"])


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = stage_config(args, args.command if args.command != "export" else "registry")
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "export":
        from models.export import export_hf
        from tasks.stage import GptflowError

        try:
            out = export_hf(Path(require(args.model, "model folder")),
                            Path(require(args.tokenizer, "tokenizer folder")) / "tokenizer.json", Path(args.out))
        except ValueError as e:  # a missing file, or a model option transformers cannot express
            raise GptflowError(f"export: {e}") from None
        print(f"exported a Hugging Face model to {out}")
        return 0
    params: dict[str, Any] = {}
    if args.command == "data" and args.input:
        cfg = cfg.model_copy(update={"inputs": [data_input(p) for p in args.input]})
    elif args.command == "tokenizer":
        params["corpus"] = require(args.input, "corpus")
    elif args.command == "pretrain":
        params["shards"] = require(args.input, "shards folder")
    elif args.command in ("sft", *ALIGN_STAGES, "eval", "classify"):
        params.update(zip(("model", "tokenizer"), model_source(args), strict=True))
    if args.command == "ppo":
        params["reward_model"] = require(args.reward_model, "reward model folder") if args.reward_model else None
    warm = None
    if args.command == "data":  # the workers' forkserver and the stage's imports, while Prefect's server starts
        from tasks.data import warm_up

        warm = functools.partial(warm_up, cfg)
    start_prefect(args)
    from flows import stages  # prefect and mlflow: seconds of imports, while the server starts

    result = run_flow(args, getattr(stages, f"{args.command}_flow"), warm, config=cfg, workdir=args.workdir, **params)
    print(json.dumps({"dir": str(result.dir), **result.model_dump(mode="json", include={
        "stage", "path", "counts", "metrics", "files", "cached"})}, indent=2, default=str))
    return 0


def start_prefect(args: argparse.Namespace) -> None:
    """With no Prefect server configured, start this run's own now, before the heavy imports, so that it comes up
    while they run (`infra/prefect_server.py`). Called once the config and inputs are checked."""
    if not os.environ.get("PREFECT_API_URL"):
        from infra.prefect_server import local_server

        args.prefect = local_server()


def run_flow(args: argparse.Namespace, flow: Callable[..., Any], warm: Callable[[], None] | None = None,
             **params: Any) -> Any:
    """Call `flow` against this run's Prefect server (if `start_prefect` started one). While the server finishes
    starting, MLflow's store is opened and `warm` (a stage's own start-up, such as its worker pool) runs."""
    from tasks import tracking

    if warm is not None:
        warm()
    tracking.set_experiment()
    server = getattr(args, "prefect", None)
    if server is None:
        with prefect_errors(os.environ.get("PREFECT_API_URL", "")):
            return flow(**params)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.stage import GptflowError

    try:
        url = server.api_url()
    except RuntimeError as e:
        raise GptflowError(f"{e} (its errors are above); or point PREFECT_API_URL at a running server") from e
    # No flow-run heartbeats on this run's own server: they are for a server's automations to notice a crashed
    # run, and this one runs no services and stops with the run. The flow's end would also wait up to 1 s for
    # the heartbeat thread, which sleeps in 1 s steps.
    with temporary_settings({PREFECT_API_URL: url, "flows.heartbeat_frequency": None}), prefect_errors(url):
        return flow(**params)


@contextlib.contextmanager
def prefect_errors(url: str) -> Iterator[None]:
    """The Prefect server gone mid-run (stopped, restarted, its machine down): once Prefect's client has spent
    its bounded retries (`infra.env`), one line naming the server instead of pages of httpx traceback. Stage
    folders already sealed stay, and the rerun reuses them."""
    import httpx

    from tasks.stage import GptflowError

    try:
        yield
    except httpx.TransportError as e:  # refused, reset, timed out: the network side, not an HTTP status
        # Prefect's API log handler has just written "--- Error logging to API ---" with no line end: ours on its own
        print(file=sys.stderr)
        raise GptflowError(f"the Prefect server at {url} stopped answering mid-run ({type(e).__name__}): start it "
                           "again (or unset PREFECT_API_URL) and rerun; finished stages are kept and reused") from None


def quiet_logs() -> None:
    """Our stages' progress at INFO; libraries' chatter (HTTP requests, datatrove's stat dumps) at WARNING.
    Full datatrove logs stay in each data stage's `logs/` folder."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("tasks", "flows", "eval", "models"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_env()
    quiet_logs()
    from infra.atomic import DiskFullError
    from tasks.stage import GptflowError

    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "import":
            return cmd_import(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_run(args) if args.command == "run" else cmd_stage(args)
    except (GptflowError, FileNotFoundError, DiskFullError) as e:  # DiskFullError: a full disk, named with its free space
        print(f"gptflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptflow: interrupted; finished stages are kept and reused on the next run", file=sys.stderr)
        return 130


def run_cli(argv: list[str] | None = None) -> int:
    """The `gptflow` command: `main`, then a quick exit. At shut-down the interpreter's garbage collector walks the
    whole heap (Prefect, MLflow, datatrove: ~0.6-1 s here); frozen objects are skipped. Exit handlers still run.

    If whatever reads our output goes away (`gptflow plan ... | head`), stop quietly as `cat` does: no traceback,
    exit status 141 (128 + SIGPIPE). A stage's finished work is kept, as after an interrupt."""
    try:
        rc = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null, or the interpreter's own flush at exit raises again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 141
    freeze_heap()
    return rc


if __name__ == "__main__":
    sys.exit(run_cli())
