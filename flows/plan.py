"""`gptflow plan`: what training a model costs, from its config alone (no torch, no data): the data it needs,
compute, memory, time and cost.

Presets: the pipeline presets' models, plus `gpt3-175b` and `llama2-7b` for planning only.
"""

from __future__ import annotations

from models.config import GPTConfig
from models.plan import PEAK_BF16_FLOPS, matrix_weights, plan

GPUS = {name.lower(): flops for name, flops in PEAK_BF16_FLOPS.items()}  # `--gpu` choices: the one peak table

PLAN_ONLY = {
    # Brown et al. 2020, table 2.1: 96 layers, d_model 12288, 96 heads, context 2048, GPT-2 BPE vocabulary.
    "gpt3-175b": GPTConfig(arch="gpt2", vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
    # Touvron et al. 2023 (Llama 2 7B): 32 layers, d 4096, 32 heads, SwiGLU 11008, context 4096, vocab 32000.
    "llama2-7b": GPTConfig(arch="llama", vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096,
                           ffn_hidden=11008, tie_embeddings=False),
}


# The data stage's yield, measured on the bundled crawl sample (data/crawl/, 4 files, 86 page records) with the
# default DataConfig and no text sources: 4 English documents kept, 9,018 bytes, 3,048 tokens with the tiny
# preset's 2,048 BPE and 2,142 with GPT-2's (4.2 bytes a token); 105 kept bytes a page. A Common Crawl file holds
# ~30,000 pages (a 2024 snapshot: ~2.7B pages over ~90,000 files), so ~3.2 MB of kept text, ~750k GPT-2 tokens
# (a smaller vocabulary cuts more tokens, so GPT-2's count is the safe side). FineWeb, with lighter filters,
# kept ~1.7M tokens a file (15T tokens over 96 snapshots).
KEPT_BYTES_PER_PAGE = 105
PAGES_PER_CRAWL_FILE = 30_000
BYTES_PER_TOKEN = 4.2
TOKENS_PER_CRAWL_FILE = 750_000  # KEPT_BYTES_PER_PAGE * PAGES_PER_CRAWL_FILE / BYTES_PER_TOKEN, rounded
CRAWL_FILE_GB = {"wet": 0.1, "warc": 1.1}  # compressed size of one Common Crawl file, roughly
TRAIN_SHARE = 0.95  # the tokenizer stage's default val_fraction holds out 5%


def data_needs(tokens: int, vocab_size: int) -> dict[str, float]:
    """Crawl files (at the measured yield), their download and the shards' disk for `tokens` training tokens."""
    import math

    files = math.ceil(tokens / (TOKENS_PER_CRAWL_FILE * TRAIN_SHARE))
    dtype_bytes = 2 if vocab_size <= 2**16 else 4  # the shards' uint16 / uint32
    return {"files": files, "wet_gb": files * CRAWL_FILE_GB["wet"], "warc_gb": files * CRAWL_FILE_GB["warc"],
            "shards_gb": tokens / TRAIN_SHARE * dtype_bytes / 1e9}


def preset_data_tokens(preset: str) -> int | None:
    """Train tokens a pipeline preset's data should yield: its listing's max_files at the measured yield; None
    when its inputs are not a listing with max_files (they are measured by running the data stage)."""
    from flows.presets import PRESETS

    data = PRESETS[preset]().data
    if data.max_files is None or not all(p.endswith((".paths.gz", ".paths")) for p in data.inputs):
        return None
    return int(len(data.inputs) * data.max_files * TOKENS_PER_CRAWL_FILE * TRAIN_SHARE)


def model_for(preset: str) -> GPTConfig:
    from flows.presets import PRESETS
    from tasks.stage import GptflowError

    if preset in PLAN_ONLY:
        return PLAN_ONLY[preset]
    if preset in PRESETS:
        return PRESETS[preset]().pretrain.model
    raise GptflowError(f"unknown preset '{preset}'; choose one of: {', '.join([*PRESETS, *PLAN_ONLY])}")


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def render_plan(preset: str, tokens: int | None, gpu: str, mfu: float, n_gpus: int,
                price_per_hour: float | None = None) -> str:
    """The plan as text. `tokens`: default the pipeline preset's schedule (steps x tokens per step), else
    Chinchilla's 20 per parameter; `price_per_hour`: per GPU, for the cost line."""
    from flows.presets import PRESETS

    cfg = model_for(preset)
    if tokens is None and preset in PRESETS:
        pre = PRESETS[preset]().pretrain
        tokens = pre.steps * pre.tokens_per_step
    p = plan(cfg, tokens=tokens, gpu_flops=GPUS[gpu], mfu=mfu, n_devices=n_gpus)
    need = data_needs(p["tokens"], cfg.vocab_size)
    mw = matrix_weights(cfg)
    mem = p["memory_per_device_bytes"]
    n = p["params"]
    lines = [
        f"plan for {preset}: {cfg.arch}, {cfg.n_layer} layers, d_model {cfg.n_embd:,}, {cfg.n_head} heads, "
        f"vocab {cfg.vocab_size:,}, context {cfg.block_size:,}",
        f"  parameters            {n:,} ({p['params_non_embedding']:,} without position/untied-embedding tables)",
        f"  weights in matrices   {mw['total']:,} (embedding {mw['embedding']:,}; unembedding {mw['unembedding']:,}; "
        f"Q {mw['attn_q']:,}, K {mw['attn_k']:,}, V {mw['attn_v']:,}, O {mw['attn_o']:,} over all layers; MLP {mw['mlp']:,})",
        f"  tokens                {p['tokens']:,} (Chinchilla-optimal: {p['chinchilla_tokens']:,} = 20 per parameter)",
        f"  training FLOPs        {p['train_flops']:.3e} (6ND alone: {p['train_flops_6nd']:.3e}; plus attention 12·L·d·T per token)",
        "  memory per device (full fine-tuning or pretraining, AdamW, mixed precision):",
        f"    16-bit weights {_gb(mem['weights'])} + 16-bit grads {_gb(mem['grads'])} + fp32 Adam m,v {_gb(n * 8)} "
        f"= {_gb(n * 12)} (12 B/param: a 7B model needs 84 GB)",
        f"    + fp32 master weights {_gb(n * 4)} = {_gb(n * 16)}; activations (micro-batch 1, no recomputation) "
        f"{_gb(mem['activations'])}",
        f"  time on {n_gpus} x {gpu.upper()} at {mfu:.0%} MFU: {p['time_hours']:,.1f} h "
        f"({p['gpu_hours']:,.0f} GPU-hours)",
        f"  cost                  {p['gpu_hours']:,.1f} GPU-hours x "
        + (f"${price_per_hour:,.2f} = ${p['gpu_hours'] * price_per_hour:,.0f}" if price_per_hour is not None
           else "--price-per-hour (not given)"),
        f"  data for one pass     {p['tokens']:,} train tokens = {need['files']:,} Common Crawl files at "
        f"{TOKENS_PER_CRAWL_FILE:,} tokens each (measured yield, {TRAIN_SHARE:.0%} to train): "
        f"~{need['wet_gb']:,.0f} GB of WET or ~{need['warc_gb']:,.0f} GB of WARC to read; shards {_gb(need['shards_gb'] * 1e9)}",
    ]
    have = preset_data_tokens(preset) if preset in PRESETS else None
    if have is not None:
        lines.append(f"  preset's data         ~{have:,} train tokens expected: {p['tokens'] / have:,.2f} passes "
                     f"(pretrain.max_passes {PRESETS[preset]().pretrain.max_passes:g})")
    return "\n".join(lines)
