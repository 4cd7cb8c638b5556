"""`gptflow plan`: what training a model costs, from its config alone (no torch, no data).

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


def render_plan(preset: str, tokens: int | None, gpu: str, mfu: float, n_gpus: int) -> str:
    cfg = model_for(preset)
    p = plan(cfg, tokens=tokens, gpu_flops=GPUS[gpu], mfu=mfu, n_devices=n_gpus)
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
    ]
    return "\n".join(lines)
