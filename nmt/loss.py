"""loss.py — the training loss: label-smoothed cross-entropy fused with the output layer.

`output_loss` takes the decoder's outputs of the real (non-pad) target positions and computes, chunk by chunk of
rows, the logits, one softmax, the loss and already its gradients (p − q for the target distribution q), so the
[tokens, V] logits never exist whole, no second cross-entropy runs for the NLL, and backward only scales the
stored gradients. Same function and gradients as `cross_entropy(linear(x), y, label_smoothing)` summed over the
rows; word-level distillation mixes a teacher's sparse distribution into q. Knows nothing of models or batches.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # logits held at once (rows x V): 32 MB of float32


def _chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


class _OutputLoss(torch.autograd.Function):
    """(loss, nll) of linear(x, weight, bias) against q = (1 - w) · [(1 - ε) onehot(target) + ε / V] + w · soft."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, smoothing, soft_ids, soft_probs, soft_weight, with_grad):
        compute = x.dtype  # the matmuls' dtype: bf16 / fp16 under autocast; the softmax runs in `exact`
        if torch.is_autocast_enabled(x.device.type):
            compute = torch.get_autocast_dtype(x.device.type)
        exact = torch.promote_types(compute, torch.float32)
        w, xc = weight.to(compute), x.to(compute)
        rows, vocab = x.size(0), weight.size(0)
        hard = 1.0 - soft_weight  # share of the label-smoothed reference distribution in q
        loss = torch.zeros((), dtype=exact, device=x.device)
        nll = torch.zeros((), dtype=exact, device=x.device)
        grads = None
        if with_grad:
            grads = (torch.empty_like(x), torch.zeros_like(weight, dtype=exact), torch.zeros_like(bias, dtype=exact))
        with torch.autocast(x.device.type, enabled=False):
            for start, end in _chunks(rows, vocab):
                xs, ts = xc[start:end], target[start:end].unsqueeze(1)  # [n, D], [n, 1]
                logits = torch.mm(xs, w.t()).to(exact).add_(bias.to(exact))  # [n, V]
                logits.sub_(logits.amax(dim=1, keepdim=True))  # shifted: the shift cancels in every term below
                picked = logits.gather(1, ts).squeeze(1)  # [n]
                mean = logits.mean(dim=1)
                soft_picked = None
                if soft_ids is not None:
                    soft_picked = (logits.gather(1, soft_ids[start:end]) * soft_probs[start:end]).sum(1)
                probs = logits.exp_()  # in place: the logits are not needed any more
                total = probs.sum(dim=1, keepdim=True)
                log_total = total.log().squeeze(1)
                row_nll = log_total - picked
                row_loss = hard * ((1.0 - smoothing) * row_nll + smoothing * (log_total - mean))
                if soft_picked is not None:
                    row_loss = row_loss + soft_weight * (log_total - soft_picked)
                nll += row_nll.sum()
                loss += row_loss.sum()
                if grads is None:
                    continue
                grad = probs.div_(total)  # softmax, then p - q in place
                if smoothing:
                    grad.sub_(hard * smoothing / vocab)
                grad.scatter_add_(1, ts, torch.full_like(ts, -hard * (1.0 - smoothing), dtype=grad.dtype))
                if soft_ids is not None:
                    grad.scatter_add_(1, soft_ids[start:end], soft_probs[start:end].to(grad.dtype).mul(-soft_weight))
                grad_c = grad.to(compute)
                grads[0][start:end] = torch.mm(grad_c, w).to(x.dtype)
                grads[1].add_(torch.mm(grad_c.t(), xs).to(exact))
                grads[2].add_(grad.sum(dim=0))
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        grad_x, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_x * grad_loss.to(grad_x.dtype), (grad_weight * grad_loss).to(weight_dtype),
                (grad_bias * grad_loss).to(bias_dtype), None, None, None, None, None, None)


def output_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                label_smoothing: float = 0.0, soft_ids: torch.Tensor | None = None,
                soft_probs: torch.Tensor | None = None, soft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and summed NLL of the output layer (weight [V, D], bias [V]) over rows: hidden [N, D], target
    [N] (every row real);
    optionally a sparse soft target per row (soft_ids / soft_probs [N, k], probabilities summing to 1) mixed in
    with weight `soft_weight`. Both sums are float32 (float64 for a float64 model); only the loss has a gradient."""
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _OutputLoss.apply(hidden, weight, bias, target, float(label_smoothing), soft_ids, soft_probs,
                             float(soft_weight), with_grad)
