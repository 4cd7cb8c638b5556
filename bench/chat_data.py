"""Chat data loading on this machine, in one run: `python -m bench.chat_data [--rounds 3] [--json FILE]`.

Seconds to read the bundled SFT and preference files and turn them into conversations and pairs, three ways,
each in a fresh process (rounds interleaved; the median counts):
- `stdlib`: the baseline, the records read with `json` and `gzip` (what the reader did before `datasets`), then
  the same adapters (`tasks.conversations.adapt_sft` / `adapt_pairs`);
- `datasets cold`: `load_sft` / `load_pairs` with an empty datasets cache: decompress, parse to Arrow, write the
  cache (a first run);
- `datasets warm`: the same with the cache filled (a rerun).
Also the seconds of `import datasets` in a fresh process. Prints ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from infra.env import REPO_ROOT

FILES = {"sft": ["data/sft/alpaca_en_demo.json.gz", "data/sft/oasst_en_tree_sample.jsonl.gz",
                 "data/sft/sharegpt_chosen_demo.json.gz"],
         "pairs": ["data/preference/dpo_en_demo.json.gz", "data/preference/hh_rlhf_harmless_sample.jsonl.gz"]}

# Runs in the child process: imports first (not timed), then the load of every file (timed).
CHILD = """
import gzip, json, sys, time
from infra.env import setup_env
setup_env()
import datasets
from tasks.conversations import PreferenceSource, SFTSource, adapt_pairs, adapt_sft, load_pairs, load_sft
mode, files = sys.argv[1], json.loads(sys.argv[2])

def stdlib_rows(path):
    text = gzip.open(path, "rt", encoding="utf-8").read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return rows, sorted({k for r in rows for k in r})

t = time.perf_counter()
n = 0
for kind, paths in files.items():
    for p in paths:
        src = SFTSource(path=p) if kind == "sft" else PreferenceSource(path=p)
        if mode == "stdlib":
            got = (adapt_sft if kind == "sft" else adapt_pairs)(*stdlib_rows(p), src)
        else:
            got = (load_sft if kind == "sft" else load_pairs)(src)
        n += len(got[0])
print(json.dumps({"seconds": time.perf_counter() - t, "items": n}))
"""


def child(mode: str, home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")}
    env.update(GPTFLOW_HOME=home, PYTHONPATH=str(REPO_ROOT))  # the datasets cache in `home`: empty at first
    out = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(FILES)], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import datasets; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"stdlib": [], "datasets cold": [], "datasets warm": []}
    items = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-chat-") as home:
            for mode, run_mode in (("stdlib", "stdlib"), ("datasets cold", "datasets"), ("datasets warm", "datasets")):
                r = child(run_mode, home)
                times[mode].append(r["seconds"])
                items[mode] = r["items"]
    assert len(set(items.values())) == 1, f"the three ways read different data: {items}"
    base = statistics.median(times["stdlib"])
    result = {"files": FILES, "items": items["stdlib"], "import_datasets_s": import_seconds(),
              **{f"{m}_s": statistics.median(t) for m, t in times.items()}}
    print(f"{items['stdlib']} conversations and pairs from {sum(map(len, FILES.values()))} bundled files; "
          f"median of {args.rounds} rounds, each in a fresh process")
    for mode, t in times.items():
        print(f"  {mode:14s} {statistics.median(t):6.3f} s   x{statistics.median(t) / base:5.1f} of stdlib")
    print(f"  import datasets {result['import_datasets_s']:5.2f} s (once per process)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
