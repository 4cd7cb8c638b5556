"""LoRA (Hu et al. 2021) on our GPT through `peft`: low-rank adapters beside the frozen linear layers.

Wrapping: the adapters are injected in place (`peft.inject_adapter_in_model`), not through a `PeftModel`. Each
targeted `nn.Linear` becomes a `peft` LoRA layer that holds the original one as `base_layer`, and the model stays our
`GPT`: its forward `(idx, targets, kv_cache)`, `generate` with the KV cache, `configure_optimizer` (which keeps
only parameters that require grad), `config` and `flops_per_token` work unchanged. A `PeftModel` would put
`base_model.model.` in front of every name and route forward through transformers-style keyword arguments.

Use on a Ray Train worker:
    raw = add_lora(load_model(base_dir), opts)     # only adapter parameters require grad
    opt = raw.configure_optimizer(lr, wd)           # AdamW over the adapters alone
    model = ray.train.torch.prepare_model(raw)     # DDP: see below
    ... train; checkpoints hold `raw.state_dict()` (base + adapters), a resume rebuilds the same way ...
    if rank == 0:
        save_adapters(raw, out / "adapters")        # small: the adapters alone
        save_model(merge_lora(raw), out / "model")  # a plain GPT: checkpoint.py and export.py take it as is

DDP: frozen parameters are fine. DDP registers only parameters that require grad, and every adapter takes part in
every forward, so `find_unused_parameters` is not needed (tests/unit/test_lora.py runs DDP steps). FSDP2
(`fully_shard`) shards parameter by parameter, so frozen and trainable weights may share a block. Before saving,
gather the full state dict on rank 0 and pass it as `state_dict`. For merging, rebuild the model from it:
`m = add_lora(GPT(cfg), opts); m.load_state_dict(sd); merge_lora(m)`.

The output head and the embeddings are never targets: the head is tied to the token embedding, so merging into it
would change the embedding too, and the chunked loss (`GPTConfig.loss_chunk`) reads `lm_head.weight` directly.

torch and peft (~3-8 s to import) are imported inside the functions, so that stage configs can import
`LoraOptions` cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import torch

    from models.gpt import GPT

ADAPTER = "default"  # peft's adapter name; we keep one adapter per model
ADAPTERS_FILE = "adapters.safetensors"
ADAPTERS_CONFIG = "adapters.json"
# Every linear layer inside a transformer block, by the block's MLP (models/gpt.py names).
BLOCK_LINEARS = {
    "two matrices": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),  # gpt2; llama with mlp="relu2"
    "swiglu": ("attn.c_attn", "attn.c_proj", "mlp.w_gate", "mlp.w_up", "mlp.c_proj"),
}


class LoraOptions(BaseModel):
    """Which linear layers get adapters and how big they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(16, gt=0, description="Rank r of each adapter pair (B: out x r, A: r x in).")
    alpha: float = Field(
        32.0, gt=0, description="Scale numerator: the update is (alpha / r) * B A (alpha = 2r, a common choice)."
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapters' input (QLoRA used 0.05-0.1). 0 by default, as in peft: any dropout "
        "keeps a dropped copy of each adapted layer's input for the backward pass (+35 % activations in bench.sft).",
    )
    target_modules: tuple[str, ...] | None = Field(
        None,
        description="Linear layers to adapt, by name or name ending inside a block: 'c_attn', 'c_proj' (attention "
        "and MLP), 'attn.c_proj', 'mlp.c_fc' (gpt2), 'w_gate', 'w_up' (llama). None: every linear layer of "
        "attention and MLP, which QLoRA found needed to match full fine-tuning.",
    )
    layers: tuple[int, ...] | None = Field(
        None, description="Adapt only these blocks (0-based, e.g. the top few of a large model); None: all."
    )
    rslora: bool = Field(
        False, description="Rank-stabilised scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)."
    )

    def target_names(self, model: GPT) -> list[str]:
        """Full module names of the adapted layers of `model`; a name that matches nothing is an error."""
        cfg = model.config
        layers = range(cfg.n_layer) if self.layers is None else self.layers
        bad = [i for i in layers if not 0 <= i < cfg.n_layer]
        if bad:
            raise ValueError(f"LoRA layers {bad} out of range: the model has {cfg.n_layer} blocks (0..{cfg.n_layer - 1})")
        linears = BLOCK_LINEARS["swiglu" if cfg.swiglu else "two matrices"]
        wanted = linears if self.target_modules is None else self.target_modules
        for name in wanted:
            if not any(lin == name or lin.endswith("." + name) for lin in linears):
                raise ValueError(
                    f"LoRA target module '{name}' is not a linear layer of a {cfg.arch} block; "
                    f"choose from {', '.join(linears)} (or their last part, e.g. 'c_proj')"
                )
        chosen = [lin for lin in linears if any(lin == n or lin.endswith("." + n) for n in wanted)]
        return [f"blocks.{i}.{lin}" for i in layers for lin in chosen]


# ----------------------------------------------------------------------------------------------------------
# add, count, merge


def add_lora(model: GPT, opts: LoraOptions) -> GPT:
    """Inject adapters into `model` in place and freeze everything else; returns the same model, ready to train.

    peft initialises A randomly and B to zero, so the model's outputs are unchanged until the first step.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(model, "peft_config", None):
        raise ValueError("the model already has LoRA adapters (merge_lora them first)")
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=opts.target_names(model),  # full names: peft matches them exactly
        use_rslora=opts.rslora,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():  # peft does this too; an invariant the tests and DDP rely on
        p.requires_grad_(".lora_" in name)
    model.lora_options = opts
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    """Trainable and total parameters (a tied weight counted once) and the trainable share."""
    params = list(model.parameters())  # unique tensors: the tied head appears once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "trainable_share": trainable / total}


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(model: GPT) -> GPT:
    """Fold each adapter into its weight (W + scale * B A) and put the plain `nn.Linear` back, in place.

    Returns the same object as a plain GPT: the state dict of `GPT(config)`, every parameter trainable again, so
    that `models.checkpoint.save_model` and `models.export.export_hf` take it as they take any model.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    for name, layer in layers.items():
        layer.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.peft_config, model.lora_options
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------------------
# adapters on their own


def save_adapters(model: GPT, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter tensors alone (`adapters.safetensors`) and their options with the base model's config
    (`adapters.json`) into out_dir. Under FSDP pass the gathered full `state_dict`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    opts = getattr(model, "lora_options", None)
    if opts is None:
        raise ValueError("the model has no LoRA adapters to save (add_lora first)")
    sd = get_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER, save_embedding_layers=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(out_dir / ADAPTERS_FILE),
              metadata={"format": "pt"})
    meta = {"lora": opts.model_dump(mode="json"), "base": model.config.model_dump(mode="json")}
    (out_dir / ADAPTERS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_adapters(model: GPT, adapter_dir: Path) -> GPT:
    """Attach the adapters saved by `save_adapters` to a base `model` (in place); returns it, ready to train on.

    Every adapter of the file must fit a layer of the model by name and shape, and every layer must get one.
    """
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    meta_path, weights_path = adapter_dir / ADAPTERS_CONFIG, adapter_dir / ADAPTERS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ValueError(f"missing LoRA adapter file: {path}")
    try:
        opts = LoraOptions.model_validate(json.loads(meta_path.read_text())["lora"])
        sd = load_file(str(weights_path))
    except (json.JSONDecodeError, KeyError, ValidationError, SafetensorError, OSError) as e:
        raise ValueError(f"malformed LoRA adapters in {adapter_dir}: {e}") from e
    add_lora(model, opts)
    try:
        result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER)
    except RuntimeError as e:  # a shape mismatch: adapters of another model
        raise ValueError(f"LoRA adapters in {weights_path} do not fit the model: {e}") from e
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"LoRA adapters in {weights_path} do not fit the model: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")
    return model
