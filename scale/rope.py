"""
Beyond the paper: the handoff across RoPE bases (train.py --rebase_rope=true). A student whose
decoder rotates K with another RoPE base than the teacher's hands over K the teacher would
misread; RebasedRoPE wraps the student once at setup so that the K it hands over is re-rotated
to the teacher's base (rebase_rope_k), exactly. kvshare.py is unchanged: it never knows.
"""
import torch
import torch.nn as nn

from model import apply_rope, positions_from_mask, rope_cos_sin


def rebase_rope_k(k, positions, head_dim, theta_from, theta_to):
    """K stored after RoPE with base theta_from -> K as RoPE with base theta_to stores it.

    RoPE turns each frequency pair (i, i + head_dim/2) of K by the angle position * theta^(-2i/d),
    a rotation, so it can be undone and redone exactly: rotate back by the student's angles
    (apply_rope with -sin), forward by the teacher's, with model.py's own cos/sin tables (so the
    result is what the teacher's Attention computes from the same pre-RoPE K, up to float
    rounding). V carries no position and is unchanged.
    k: (B, n_kv_heads, T, head_dim); positions: (B, T), the RoPE position of each column."""
    if theta_from == theta_to:
        return k
    cos_from, sin_from = rope_cos_sin(positions, head_dim, theta_from, torch.float32)
    cos_to, sin_to = rope_cos_sin(positions, head_dim, theta_to, torch.float32)
    unrotated = apply_rope(k.float(), cos_from, -sin_from)                  # (B, nkv, T, hd)
    return apply_rope(unrotated, cos_to, sin_to).to(k.dtype)


def rebase_rope_kv(kv, positions, theta_from, theta_to):
    """Every layer's (K, V) with K re-based (rebase_rope_k, detached: only the teacher reads it)
    at positions (B, T)."""
    if theta_from == theta_to:
        return kv
    head_dim = kv[0][0].shape[-1]
    return [(rebase_rope_k(k.detach(), positions, head_dim, theta_from, theta_to), v)
            for k, v in kv]


class RebasedRoPE(nn.Module):
    """A student (VLM, Decoder or scale.pack.PackedRows) whose returned K/V have K in the
    teacher's RoPE base (theta_to) instead of its own (theta_from); its logits are unchanged.
    Positions: the call's position_ids (packed rows) or those of its attention_mask (padded)."""

    def __init__(self, module, theta_from, theta_to):
        super().__init__()
        self.module, self.theta_from, self.theta_to = module, theta_from, theta_to

    def forward(self, *args, **kw):
        logits, kv = self.module(*args, **kw)
        if kv is None:
            return logits, kv
        positions = (kw["position_ids"] if kw.get("position_ids") is not None
                     else positions_from_mask(kw["attention_mask"]))              # (B, T)
        return logits, rebase_rope_kv(kv, positions, self.theta_from, self.theta_to)
