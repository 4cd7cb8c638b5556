"""`python -m tasks.data [OUT_DIR]`: the data stage alone with the default config, into OUT_DIR (default
`<runs>/data`); prints the totals and the realised mix. Rerunning into the same folder resumes."""

import json
import logging
import sys
from pathlib import Path

from infra.env import runs_dir, setup_env


def main() -> None:
    setup_env()  # offline switches and caches, before datatrove and huggingface_hub are imported
    logging.basicConfig(level=logging.INFO)
    from tasks.data import DataConfig, build_corpus, crawl_inputs

    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else runs_dir() / "data"
    cfg = DataConfig()
    corpus = build_corpus(cfg, crawl_inputs(cfg), out_dir)
    print(json.dumps({"totals": corpus.counts["totals"], "mix": corpus.counts["mix"]}, indent=2))


if __name__ == "__main__":
    main()
