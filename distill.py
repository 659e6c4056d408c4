"""
The source-selective KD objective of LinguDistill (README "How LinguDistill works here").

    loss = CE(student, labels)  +  alpha * KD(teacher || student)

CE runs on every real response token. KD runs only on response tokens of examples whose
`source` has a KD weight > 0 (policy "selective": language-intensive sources 1, vision-heavy
0) and is averaged over the weighted number of KD tokens, exactly once.

All inputs are already aligned (the caller does the next-token shift): position r of the
(B, R, V) logits predicts response token r, and response_mask (B, R) marks answer + EOS.
Bugs of public KD code this file avoids: softmax in float32, one normalisation (torchtune
once divided twice), a guarded all-masked batch, logits sliced to the shared vocabulary prefix.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

POLICIES = ("none", "uniform", "selective")
DIVERGENCES = ("fkl", "rkl", "jsd")
KIND_WEIGHTS = {"language": 1.0, "vision": 0.0}   # source kind -> KD weight (the source gate)
_FLOOR = -1e30  # -inf logits (masked vocab entries) are raised to this: p = 0 exactly, no inf - inf


def _log_probs(logits, temperature):
    """log_softmax(logits / T) in at least float32 (bf16/fp16 are upcast; float64 stays)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax((logits.to(dtype) / temperature).clamp(min=_FLOOR), dim=-1)


def _kl(log_p, log_q):
    """KL(p || q) per row from log-probabilities (..., V) -> (...). Entries with p = 0 add 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _check_kd_args(divergence, temperature, beta):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; expected one of {DIVERGENCES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, found {temperature}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, found beta={beta}")


def kd_divergence(student_logits, teacher_logits, divergence="fkl", temperature=1.0, beta=0.5):
    """Per-token divergence (N,) of student (N, Vs) / teacher (N, Vt) logits at temperature T, fp32,
    x T^2, on the shared vocabulary. fkl: KL(teacher || student); rkl: KL(student || teacher); jsd:
    beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s."""
    _check_kd_args(divergence, temperature, beta)
    if len(student_logits) != len(teacher_logits):
        raise ValueError(f"kd_divergence: {len(student_logits)} student rows vs "
                         f"{len(teacher_logits)} teacher rows; expected one teacher row per token")
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_s = _log_probs(student_logits[:, :V], temperature)                  # (N, V) log p_student
    log_t = _log_probs(teacher_logits[:, :V], temperature).to(log_s.dtype)  # (N, V) log p_teacher
    if divergence == "fkl":
        d = _kl(log_t, log_s)
    elif divergence == "rkl":
        d = _kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1.0 - beta))  # log m
        d = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return d * temperature ** 2                                              # (N,)


def kd_token_sum(student_logits, teacher_logits, weights, divergence="fkl", temperature=1.0,
                 beta=0.5, chunk_size=None, index=None):
    """sum of weight * divergence over the tokens of (B, R, Vs) / (B, R, Vt) logits with weight
    (B, R) > 0, gathered first (index: their flat indices, from the host; default found here)."""
    keep = (weights.reshape(-1) > 0).nonzero()[:, 0] if index is None else index     # (N,)
    s = student_logits.reshape(-1, student_logits.shape[-1])[keep]           # (N, Vs)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep]           # (N, Vt)
    w = weights.reshape(-1)[keep]                                            # (N,)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= s.shape[0]):
        return chunked_kd_sum(s, t, w, divergence, temperature, beta, chunk_size)
    d = kd_divergence(s, t, divergence, temperature, beta)                   # (N,)
    return (w.to(d.dtype) * d).sum()


def chunked_kd_sum(s, t, w, divergence, temperature, beta, chunk_size):
    """kd_token_sum's sum, chunk_size of the N tokens at a time: the float32 (chunk, V) softmax
    temporaries of one chunk exist at a time, and each chunk runs under activation checkpointing,
    so backward does not keep every chunk's float32 tensors either (it recomputes them). What
    stays alive is the gathered (N, V) logits in their input dtype."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, found {chunk_size!r}")
    total = 0.0
    for i in range(0, s.shape[0], chunk_size):
        args = (s[i:i + chunk_size], t[i:i + chunk_size], divergence, temperature, beta)
        if torch.is_grad_enabled() and s.requires_grad:
            d = checkpoint(kd_divergence, *args, use_reentrant=False)       # (chunk,)
        else:
            d = kd_divergence(*args)
        total = total + (w[i:i + chunk_size].to(d.dtype) * d).sum()
    return total


# ----------------------------------------------------------------------------------------
# The source gate (the "selective" of LinguDistill): built once per run as a table
# source -> KD weight (table_from_kinds), applied once per micro-batch (source_weights).

def table_from_kinds(source_kinds, kind_weights=KIND_WEIGHTS):
    """Source -> KD weight table from a source -> kind mapping (world.SOURCE_KINDS for the tiny
    world, stream.RealData.source_kinds for --data_path): "language" -> 1.0, "vision" -> 0.0
    by default; pass kind_weights to try others."""
    bad = {s: k for s, k in source_kinds.items() if k not in kind_weights}
    if bad:
        raise ValueError(f"source kinds must be one of {sorted(kind_weights)}, found {bad}")
    if any(w < 0 for w in kind_weights.values()):
        raise ValueError(f"KD weights must be >= 0, found {kind_weights}")
    return {s: float(kind_weights[k]) for s, k in source_kinds.items()}


def source_weights(policy, sources, table=None):
    """(B,) KD weight per example, the source gate: none 0, uniform 1, selective table[source]."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}; expected one of {POLICIES}")
    if policy != "selective":
        return torch.full((len(sources),), 1.0 if policy == "uniform" else 0.0)
    unknown = sorted({s for s in sources if s not in (table or {})})
    if table is None or unknown:
        raise ValueError(f"source(s) {unknown} not in the KD weight table; known sources: "
                         f"{sorted(table or {})} (build the table with distill.table_from_kinds)")
    return torch.tensor([float(table[s]) for s in sources], dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# The loss

def mean_over(total, count):
    """total / count, the count of tokens it sums over (training: the step's, over every micro-batch
    and DDP rank, so the micro-batches' losses add up to the global mean); a count of 0 (no such
    token in the step) leaves the sum, which is then 0."""
    return total / count if count > 0 else total


def cross_entropy(logits, labels, response_mask, n_tokens=None, index=None):
    """Mean float32 cross-entropy over the real response tokens (B, R, V) vs (B, R), gathered first
    (index: their flat indices, from the host; default found here); divided by n_tokens or N."""
    real = response_mask.reshape(-1).nonzero()[:, 0] if index is None else index   # (N,)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[real].to(dtype),
                            labels.reshape(-1)[real], reduction="sum")
    return mean_over(total, len(real) if n_tokens is None else n_tokens)


def distill_loss(student_logits, labels, response_mask, teacher_logits, kd_weight, *, alpha=1.0,
                 divergence="fkl", temperature=1.0, beta=0.5, chunk_size=None, ce_tokens=None,
                 kd_tokens=None, ce_index=None, kd_index=None):
    """CE + alpha * KD -> {"loss", "ce", "kd"}: logits (B, R, V), labels and response_mask (B, R),
    teacher logits or None, kd_weight (B, R) the gate; CE / KD divided by ce_tokens / kd_tokens,
    over the flat indices ce_index / kd_index (default: this batch's). Inputs: check_loss_inputs."""
    real = response_mask.bool()                                              # (B, R)
    ce = cross_entropy(student_logits, labels, real, ce_tokens, ce_index)
    weights = real.float() * kd_weight.to(real.device)                      # (B, R)
    if teacher_logits is not None:         # no KD token: an empty sum, exactly 0, graph kept
        kd_sum = kd_token_sum(student_logits, teacher_logits.detach(), weights, divergence,
                              temperature, beta, chunk_size, kd_index)
    else:
        kd_sum = student_logits.reshape(-1)[:0].to(torch.promote_types(student_logits.dtype,
                                                                       torch.float32)).sum()
    kd = mean_over(kd_sum, float(weights.sum()) if kd_tokens is None else kd_tokens)
    return {"loss": ce + alpha * kd, "ce": ce.detach(), "kd": kd.detach()}


def check_loss_inputs(student_logits, labels, response_mask, teacher_logits, kd_weight, alpha):
    """What a caller of distill_loss can get wrong, each error naming what was expected."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, R), found {tuple(labels.shape)}")
    B, R = labels.shape
    for name, x, want in (("student_logits", student_logits, "(B, R, V)"),
                          ("teacher_logits", teacher_logits, "(B, R, V)"),
                          ("response_mask", response_mask, "(B, R)")):
        if x is not None and (x.dim() != len(want.split(",")) or x.shape[:2] != (B, R)):
            raise ValueError(f"{name} must be {want} = ({B}, {R}{', V' * (x.dim() == 3)}) like "
                             f"labels, found {tuple(x.shape)}")
    V = student_logits.shape[-1]
    targets = labels[response_mask.bool()]
    if len(targets) and not (int(targets.min()) >= 0 and int(targets.max()) < V):
        raise ValueError(f"labels must be token ids in [0, {V}) (the student's vocabulary), "
                         f"found {int(targets.min())}..{int(targets.max())}")
    want = f"kd_weight must be (B, R) = ({B}, {R}) per token, weights >= 0"
    if kd_weight.shape != (B, R) or not bool((kd_weight >= 0).all()):
        raise ValueError(f"{want}, found {kd_weight.tolist()}")
    if teacher_logits is None and bool((kd_weight > 0).any()):
        raise ValueError("KD weight > 0 needs teacher_logits (B, R, Vt); only a gate of zeros "
                         "(policy 'none') runs without a teacher")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, found {alpha}")
