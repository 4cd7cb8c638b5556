"""On a CUDA GPU (marker `gpu`, skipped without one): the GPT in bf16 autocast gives the CPU's fp32 loss within bf16's
precision, and KV-cache greedy decoding matches the uncached path. Run: `.venv/bin/python -m pytest -m gpu tests`."""

from __future__ import annotations

import pytest
import torch

from models.config import GPTConfig
from models.generate import generate
from models.gpt import GPT

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_autocast_loss_matches_fp32_on_cpu(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=128))
    x = torch.randint(0, 512, (4, 128))
    y = torch.roll(x, -1, dims=1)
    _, cpu_loss = model(x, y)
    model = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, gpu_loss = model(x.cuda(), y.cuda())
    assert abs(gpu_loss.item() - cpu_loss.item()) < 2e-2 * cpu_loss.item()


def test_cached_generation_matches_uncached_on_gpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    prompts = [[1, 2, 3], [4, 5]]
    cached = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    uncached = generate(model, prompts, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert cached == uncached
