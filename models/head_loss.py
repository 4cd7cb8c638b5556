"""The output head and the cross-entropy in one pass over chunks of tokens, never holding all the logits.

A plain training step holds the (tokens x vocabulary) logits several times over: in the autocast dtype, as fp32
for the loss, and as their gradient. At GPT-2 124M with 64 x 1024 tokens and 50,304 ids that is ~6.6 GB per copy.
Here each chunk's logits live only while that chunk is processed: the forward pass computes the chunk's loss and,
when gradients are wanted, the gradient of the summed loss with respect to the chunk's hidden states and the
head's weight (softmax - one-hot, times the chunk's inputs). The backward pass only scales the stored gradients
by the incoming one. The arithmetic is the same as `lm_head` + `F.cross_entropy`; only the order of the sums over
chunks differs.

Shapes: N tokens (batch x time, flattened), C = n_embd, V = vocabulary size.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value do not count in the loss (SFT masks prompts this way)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,  # noqa: ANN001
                dtype: torch.dtype, need_h: bool, need_w: bool) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            x, w = h.to(dtype), weight.to(dtype)  # cast once, not once per chunk
            valid = targets != IGNORE_INDEX  # (N,)
            count = valid.sum().clamp(min=1)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, x.size(0), chunk):
                xc, ok = x[s:s + chunk], valid[s:s + chunk]
                tc = torch.where(ok, targets[s:s + chunk], 0).unsqueeze(1)  # (n, 1); ignored rows pick id 0
                logits = (xc @ w.t()).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=1)  # (n,)
                picked = logits.gather(1, tc).squeeze(1)
                total = total + torch.where(ok, lse - picked, 0.0).sum()
                if not (need_h or need_w):
                    continue
                g = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: one (n, V) fp32 buffer per chunk
                g.scatter_add_(1, tc, torch.full_like(lse, -1.0).unsqueeze(1))  # minus the one-hot
                g = g.mul_((ok / count).unsqueeze(1)).to(dtype)  # d(mean loss) / d(logits); ignored rows zero
                if need_h:
                    grad_h[s:s + chunk] = g @ w
                if need_w:
                    grad_w += (g.t() @ xc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` over targets != -100 (0 when none counts).

    h (..., C) hidden states after the final norm; weight (V, C), the output head's; targets (...,) ids.
    Under autocast the matmuls run in the autocast dtype, like `nn.Linear` would, and the loss in fp32.
    """
    h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    grads = torch.is_grad_enabled()
    return _ChunkedHeadLoss.apply(h2, weight, t, chunk, dtype, grads and h.requires_grad,
                                  grads and weight.requires_grad)
