"""
CE and KD from one student normaliser: a fast form of distill.distill_loss, chosen once at setup
(--fused_loss=true: train.distill_setup runs variant_step with it). distill.distill_loss stays the
readable reference; tests/test_fused_loss.py proves this equal to it, loss and gradients.

The reference normalises the student's logits of a KD token twice, in float32: F.cross_entropy's
log-softmax over the whole student vocabulary (Vs ids) for CE, which it also keeps for backward,
and kd_divergence's over the V ids the teacher shares (Vs - V student-only ids, <image> and the
view tokens, come last). At temperature 1 one pass over the V shared ids gives both:

    lse_V   = logsumexp(s[:V])                          KD:  log p_s = s[:V] - lse_V
    lse_all = logaddexp(lse_V, logsumexp(s[V:]))        CE:  -log p(label) = lse_all - s[label]

(the second logsumexp covers the few student-only ids). Here every real response token is one row
of fixed-size chunks (chunk_size, the reference's KD chunking), each chunk's float32 temporaries
recomputed in backward, so no (tokens, Vs) float32 tensor outlives its chunk; KD rows carry their
gate weight, and a row without KD (weight 0: a vision source) adds exactly 0. Forward KL at
temperature 1 only: the setup refuses the others.
"""
import torch
from torch.utils.checkpoint import checkpoint

import distill


def ce_kd_sums(s, t, labels, w):
    """(CE sum, weighted forward-KL sum) over rows of student logits s (N, Vs), teacher t (N, Vt),
    labels (N,), KD weights w (N,), at temperature 1, float32."""
    V = min(s.shape[-1], t.shape[-1])
    s = s.float().clamp(min=distill._FLOOR)                                    # (N, Vs)
    lse_v = torch.logsumexp(s[:, :V], dim=-1, keepdim=True)                     # (N, 1)
    lse_all = torch.logaddexp(lse_v, torch.logsumexp(s[:, V:], -1, keepdim=True)) \
        if s.shape[-1] > V else lse_v
    ce = (lse_all[:, 0] - s.gather(1, labels[:, None])[:, 0]).sum()
    log_t = distill._log_probs(t[:, :V], 1.0)                                   # (N, V)
    kd = distill._kl(log_t, s[:, :V] - lse_v)                                   # (N,)
    return ce, (w * kd).sum()


def fused_distill_loss(student_logits, labels, response_mask, teacher_logits, kd_weight, *,
                       alpha=1.0, divergence="fkl", temperature=1.0, beta=0.5, chunk_size=None,
                       ce_tokens=None, kd_tokens=None, ce_index=None, kd_index=None):
    """distill.distill_loss (the same arguments and result) with one normaliser per student row.
    kd_index is not needed: every real response token (ce_index) is a row, KD by its weight."""
    if teacher_logits is None or divergence != "fkl" or temperature != 1.0:
        raise ValueError("fused_distill_loss: forward KL at temperature 1 with a teacher only")
    real = response_mask.bool()
    rows = real.reshape(-1).nonzero()[:, 0] if ce_index is None else ce_index      # (N,)
    s = student_logits.reshape(-1, student_logits.shape[-1])[rows]               # (N, Vs)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[rows]       # (N, Vt)
    weights = real.float() * kd_weight.to(real.device)                           # (B, R)
    y, w = labels.reshape(-1)[rows], weights.reshape(-1)[rows]
    size = len(rows) if chunk_size is None else chunk_size
    ce_sum = kd_sum = s.reshape(-1)[:0].float().sum()         # no token: exactly 0, graph kept
    recompute = torch.is_grad_enabled() and s.requires_grad and size < len(rows)
    for i in range(0, len(rows), max(size, 1)):
        args = (s[i:i + size], t[i:i + size], y[i:i + size], w[i:i + size])
        ce, kd = checkpoint(ce_kd_sums, *args, use_reentrant=False) if recompute \
            else ce_kd_sums(*args)
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    ce = distill.mean_over(ce_sum, len(rows) if ce_tokens is None else ce_tokens)
    kd = distill.mean_over(kd_sum, float(weights.sum()) if kd_tokens is None else kd_tokens)
    return {"loss": ce + alpha * kd, "ce": ce.detach(), "kd": kd.detach()}
