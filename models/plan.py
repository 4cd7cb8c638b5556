"""Back-of-the-envelope training plan for a `GPTConfig`: parameters, FLOPs, memory, tokens and time.

Pure arithmetic (no torch). Conventions:
- Parameter count: unique trainable parameters, exactly what `GPT(cfg).num_params()` reports.
- FLOPs per token: 6N + 12 * n_layer * n_embd * T (PaLM appendix B / nanoGPT), N = `param_count(cfg,
  non_embedding=True)` (lookup tables excluded, a tied embedding kept since it is the output matmul).
- Memory per device, mixed precision with AdamW: 2 bytes of 16-bit weights + 2 bytes of 16-bit grads +
  12 bytes of fp32 optimizer state (master weights, m, v) = 16 bytes/parameter by default. Pass
  optimizer_bytes=8 for 16-bit training without fp32 master weights (m and v only). `sharded=True` divides
  these by n_devices (ZeRO-3 / FSDP full shard); otherwise every device holds a full replica.
- Activations (rough): 34 * T * micro_batch * n_embd bytes per layer (Korthikanti et al. 2022, 16-bit
  activations, no recomputation; the 5*a*T^2 attention-score term is left out because fused attention does not
  store the score matrix) plus fp32 logits and their gradient, 8 * T * micro_batch * vocab_size bytes; with
  `loss_chunk`, only one chunk's, plus the gradients that the chunked loss stores (`models.head_loss`).
- Chinchilla-optimal tokens: 20 per parameter (Hoffmann et al. 2022).
"""

from __future__ import annotations

from models.config import GPTConfig

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity), by device name: the
# denominator of MFU as papers report it, and of the time a plan takes.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The datasheet peak of a GPU named as `torch.cuda.get_device_name` names it ("NVIDIA H100 80GB HBM3") or
    as a plan names it ("h100"); None for a device not in the table (a CPU, an unknown GPU)."""
    name = device_name.upper()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def param_count(cfg: GPTConfig, non_embedding: bool = False) -> int:
    """Exact number of parameters of GPT(cfg); non_embedding as in `GPT.num_params`."""
    d, f, V, b = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size, int(cfg.use_bias)
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    norm = d * (2 if cfg.arch == "gpt2" and cfg.use_bias else 1)  # LayerNorm weight (+bias) or RMSNorm weight
    attn = d * qkv + b * qkv + d * d + b * d
    n_mlp_in = 2 if cfg.swiglu else 1  # SwiGLU has gate and up projections
    mlp = n_mlp_in * (d * f + b * f) + f * d + b * d
    per_layer = 2 * norm + attn + mlp + (2 * cfg.head_dim if cfg.qk_norm else 0)
    wpe = cfg.block_size * d if cfg.arch == "gpt2" else 0
    head = 0 if cfg.tie_embeddings else V * d
    total = V * d + wpe + cfg.n_layer * per_layer + norm + head + (2 * cfg.n_layer if cfg.x0_mix else 0)
    if non_embedding:
        total -= wpe + (0 if cfg.tie_embeddings else V * d)
    return total


def matrix_weights(cfg: GPTConfig) -> dict[str, int]:
    """Weights of the matrices used in the forward pass: no biases, norms or position tables.

    The output (unembedding) matrix counts separately from the input embedding even when tied: it is a
    second V x d matrix multiply. For GPT-3 175B this gives 2 * 617,558,016 + 96 * 12 * 12288^2 =
    175,181,291,520 (q, k, v and o each 96 * 12288^2 = 14,495,514,624).
    """
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    kv = cfg.kv_heads * cfg.head_dim
    n_mlp = 3 if cfg.swiglu else 2
    out = {
        "embedding": V * d,
        "unembedding": V * d,
        "attn_q": L * d * d,
        "attn_k": L * d * kv,
        "attn_v": L * d * kv,
        "attn_o": L * d * d,
        "mlp": L * n_mlp * d * cfg.ffn_dim,
    }
    out["total"] = sum(out.values())
    return out


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Training (forward + backward) FLOPs per token: 6N + 12 * n_layer * n_embd * T."""
    T = cfg.block_size if seq_len is None else seq_len
    return 6 * param_count(cfg, non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T


def training_memory_bytes(
    n_params: float, weight_bytes: float = 2, grad_bytes: float = 2, optimizer_bytes: float = 12
) -> dict[str, float]:
    """Model-state memory: weights, gradients and optimizer state (default 2 + 2 + 12 = 16 bytes/param)."""
    out = {
        "weights": n_params * weight_bytes,
        "grads": n_params * grad_bytes,
        "optimizer": n_params * optimizer_bytes,
    }
    out["total"] = sum(out.values())
    return out


def activation_bytes(cfg: GPTConfig, micro_batch: int = 1, seq_len: int | None = None) -> float:
    """Rough activation memory of one micro-batch kept for the backward pass (see module docstring)."""
    T = cfg.block_size if seq_len is None else seq_len
    layers = 34 * T * micro_batch * cfg.n_embd * cfg.n_layer
    tokens = T * micro_batch
    if cfg.loss_chunk:  # one chunk's fp32 logits, plus the stored gradients of the hidden states and fp32 head
        logits = 8 * min(cfg.loss_chunk, tokens) * cfg.vocab_size + 4 * tokens * cfg.n_embd + 4 * cfg.vocab_size * cfg.n_embd
    else:
        logits = 8 * tokens * cfg.vocab_size
    return float(layers + logits)


def plan(
    cfg: GPTConfig,
    tokens: int | None = None,
    gpu_flops: float = PEAK_BF16_FLOPS["H100"],
    mfu: float = 0.4,
    weight_bytes: float = 2,
    grad_bytes: float = 2,
    optimizer_bytes: float = 12,
    n_devices: int = 1,
    micro_batch: int = 1,
    sharded: bool = False,
) -> dict:
    """Parameters, training FLOPs, memory per device and wall-clock time for training on `tokens` tokens
    (default: the Chinchilla-optimal 20 tokens per parameter) at the given model FLOPs utilization."""
    if not 0 < mfu <= 1 or gpu_flops <= 0 or n_devices < 1:
        raise ValueError("need 0 < mfu <= 1, gpu_flops > 0 and n_devices >= 1")
    n = param_count(cfg)
    chinchilla = 20 * n
    tokens = chinchilla if tokens is None else tokens
    fpt = flops_per_token(cfg)
    train_flops = fpt * tokens
    state = training_memory_bytes(n, weight_bytes, grad_bytes, optimizer_bytes)
    if sharded:
        state = {k: v / n_devices for k, v in state.items()}
    acts = activation_bytes(cfg, micro_batch)
    seconds = train_flops / (gpu_flops * mfu * n_devices)
    return {
        "params": n,
        "params_non_embedding": param_count(cfg, non_embedding=True),
        "matrix_weights": matrix_weights(cfg)["total"],
        "tokens": tokens,
        "chinchilla_tokens": chinchilla,
        "tokens_per_param": tokens / n,
        "flops_per_token": fpt,
        "train_flops": train_flops,
        "train_flops_6nd": 6 * n * tokens,
        "memory_per_device_bytes": {
            **{k: v for k, v in state.items() if k != "total"},
            "activations": acts,
            "total": state["total"] + acts,
        },
        "bytes_per_param": weight_bytes + grad_bytes + optimizer_bytes,
        "memory_convention": (
            f"{weight_bytes:g} B weights + {grad_bytes:g} B grads + {optimizer_bytes:g} B optimizer state per "
            f"parameter{' sharded over ' + str(n_devices) + ' devices' if sharded else ', replicated'}; "
            f"activations for micro_batch={micro_batch} at T={cfg.block_size}, no recomputation"
        ),
        "n_devices": n_devices,
        "mfu": mfu,
        "time_seconds": seconds,
        "time_hours": seconds / 3600,
        "gpu_hours": seconds * n_devices / 3600,
    }
