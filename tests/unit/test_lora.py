"""LoRA on our GPT (models/lora.py): only adapters train, merging is exact, adapters save and reload on their own,
targets by option, and a merged model exports to transformers with the same logits.

Run: `.venv/bin/python -m pytest tests/unit/test_lora.py -q` (~20 s, most of it importing peft and transformers).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_model, save_model
from models.generate import generate
from models.gpt import GPT, GPTConfig
from models.lora import ADAPTERS_FILE, LoraOptions, add_lora, count_parameters, load_adapters, merge_lora, save_adapters

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {"gpt2": dict(arch="gpt2"), "llama_gqa": dict(arch="llama", n_kv_head=2),
         "llama_relu2": dict(arch="llama", mlp="relu2", qk_norm=True, x0_mix=True)}


def tiny(arch: str = "gpt2", **kw) -> GPTConfig:
    return GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **ARCHS[arch], **kw)


def base_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def train_steps(model: GPT, steps: int = 4, lr: float = 1e-2) -> None:
    """A few real AdamW steps (the model's own optimizer) on fixed random tokens."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (4, 17), generator=gen)
    opt = model.configure_optimizer(lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapter_parameters_train(arch):
    model = add_lora(base_model(tiny(arch)), LoraOptions(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = snapshot(model)
    train_steps(model)
    after = model.state_dict()
    for k, v in before.items():
        if ".lora_" in k:
            assert not torch.equal(v, after[k]), f"adapter {k} did not change"
        else:
            assert torch.equal(v, after[k]), f"base tensor {k} changed"
    counts = count_parameters(model)
    assert counts["trainable"] == sum(before[n].numel() for n in trainable)
    assert counts["total"] == base_model(tiny(arch)).num_params() + counts["trainable"]


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_gives_the_adapted_logits(arch):
    cfg = tiny(arch)
    model = add_lora(base_model(cfg), LoraOptions(rank=4, dropout=0.1))
    train_steps(model)
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        adapted, _ = model(idx)
        plain, _ = base_model(cfg).eval()(idx)
    adapted_tokens = generate(model, [[3, 1, 4, 1, 5]], 8, temperature=0)

    merged = merge_lora(model)
    assert type(merged) is GPT and not hasattr(merged, "peft_config")
    assert sorted(merged.state_dict()) == sorted(GPT(cfg).state_dict())
    assert merged.lm_head.weight is merged.wte.weight  # still tied
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        logits, _ = merged.eval()(idx)
    assert (adapted - plain).abs().max() > 1e-3  # the adapters did something
    assert (logits - adapted).abs().max() < 1e-5
    assert generate(merged, [[3, 1, 4, 1, 5]], 8, temperature=0) == adapted_tokens  # KV cache path too


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapters_hold_only_adapters_and_reload_to_the_same_logits(tmp_path, arch):
    cfg = tiny(arch)
    model = add_lora(base_model(cfg), LoraOptions(rank=4))
    train_steps(model)
    save_adapters(model, tmp_path / "adapters")
    saved = load_file(str(tmp_path / "adapters" / ADAPTERS_FILE))
    lora = {k for k in model.state_dict() if ".lora_" in k}
    assert {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            for k in saved} == lora
    assert sum(t.numel() for t in saved.values()) == count_parameters(model)["trainable"]

    reloaded = load_adapters(base_model(cfg), tmp_path / "adapters").eval()
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(idx)[0], model(idx)[0])
    assert reloaded.lora_options == model.lora_options


def test_full_state_dict_rebuilds_and_merges_as_under_fsdp(tmp_path):
    """The FSDP recipe of models/lora.py: a gathered full state dict (base + adapters) rebuilt into a fresh LoRA
    model merges to the trained model's logits, and `save_adapters` takes it as `state_dict`."""
    cfg = tiny("llama_gqa")
    model = add_lora(base_model(cfg), LoraOptions(rank=4))
    train_steps(model)
    full = snapshot(model)
    rebuilt = add_lora(GPT(cfg), LoraOptions(rank=4))
    rebuilt.load_state_dict(full)
    save_adapters(rebuilt, tmp_path / "a", state_dict=full)
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert (merge_lora(rebuilt).eval()(idx)[0] - model(idx)[0]).abs().max() < 1e-5
        assert torch.equal(load_adapters(base_model(cfg), tmp_path / "a").eval()(idx)[0], model(idx)[0])


def test_adapters_refuse_another_model_and_missing_files(tmp_path):
    model = add_lora(base_model(tiny()), LoraOptions(rank=4))
    save_adapters(model, tmp_path / "a")
    wider = GPTConfig(arch="gpt2", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=48)
    with pytest.raises(ValueError, match="do not fit the model"):
        load_adapters(GPT(wider), tmp_path / "a")
    with pytest.raises(ValueError, match="missing LoRA adapter file"):
        load_adapters(GPT(tiny()), tmp_path / "nothing")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoraOptions())
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(GPT(tiny()))


def test_target_modules_layers_and_rank_by_option():
    opts = LoraOptions(rank=2, target_modules=("c_attn", "mlp.c_proj"), layers=(1,))
    model = add_lora(base_model(tiny("llama_gqa")), opts)
    adapted = {n.removesuffix(".lora_A.default.weight"): p.shape for n, p in model.named_parameters()
               if n.endswith(".lora_A.default.weight")}
    assert adapted == {"blocks.1.attn.c_attn": (2, 32), "blocks.1.mlp.c_proj": (2, 128)}  # A: (r, in); ffn 128
    short = LoraOptions(target_modules=("c_proj",)).target_names(base_model(tiny()))
    assert short == ["blocks.0.attn.c_proj", "blocks.0.mlp.c_proj", "blocks.1.attn.c_proj", "blocks.1.mlp.c_proj"]


@pytest.mark.parametrize("target", ["q_proj", "lm_head", "wte", "w_gate"])  # w_gate: a llama layer, gpt2 model
def test_wrong_target_module_is_an_error_naming_it(target):
    with pytest.raises(ValueError, match=f"'{target}' is not a linear layer of a gpt2 block"):
        add_lora(base_model(tiny()), LoraOptions(target_modules=(target,)))
    with pytest.raises(ValueError, match=r"layers \[2\] out of range"):
        add_lora(base_model(tiny()), LoraOptions(layers=(0, 2)))
    with pytest.raises(ValueError, match="extra"):
        LoraOptions(r=4)


def test_lora_under_ddp_needs_no_unused_parameter_search():
    """DDP over a LoRA model (a one-rank gloo group): the reducer sees only adapters; a second step would fail with
    'Expected to have finished reduction' if any registered parameter went without a gradient."""
    import torch.distributed as dist

    model = add_lora(base_model(tiny("llama_gqa")), LoraOptions(rank=4))
    before = snapshot(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
        opt = model.configure_optimizer(1e-2, 0.0)
        x = torch.randint(0, 64, (2, 17))
        for _ in range(3):
            ddp(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if ".lora_" not in k)
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if ".lora_B" in k)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])  # transformers has no relu2 or qk_norm Llama
def test_merged_model_saves_and_exports_to_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.save(str(tmp_path / "tokenizer.json"))

    model = add_lora(base_model(tiny(arch)), LoraOptions(rank=4))
    train_steps(model)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        adapted, _ = model(idx)
    save_model(merge_lora(model), tmp_path / "model")
    from models.export import export_hf

    with torch.no_grad():
        assert (load_model(tmp_path / "model").eval()(idx)[0] - adapted).abs().max() < 1e-5
        out = export_hf(tmp_path / "model", tmp_path / "tokenizer.json", tmp_path / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (hf(idx).logits - adapted).abs().max() < 1e-4  # the export test's tolerance
