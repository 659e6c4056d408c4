"""
The CUDA forms of attention, chosen once at setup (train.py, eval.py, tools/generate.py call
use_cuda_attention when the run is on a GPU); model.reference_attention stays the readable
reference, and tests/test_gpu_paths.py proves the forms equal to it on the CPU.

- cuda_attention: SDPA's fused kernels. The flash kernel takes no mask and the memory-efficient
  kernel no mask with fewer K/V heads than query heads, so a mask with grouped-query heads would
  silently run the math kernel (fp32, the whole score matrix kept for backward): with a mask, K/V
  are repeated to the query heads.
- Packed rows (scale/pack.py) on CUDA: a FlexAttention BlockMask (segment_block_mask) run by the
  compiled flex kernel, which holds no (Tq, Tk) tensor.
"""
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from model import Attention, reference_attention


def cuda_attention(q, k, v, mask):
    """reference_attention on CUDA's fused kernels (equal to it: tests/test_gpu_paths.py)."""
    if isinstance(mask, BlockMask):
        flex = compiled_flex_attention() if q.is_cuda else flex_attention  # CPU: tests only
        return flex(q, k, v, block_mask=mask, enable_gqa=True)
    if mask is not None:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    return reference_attention(q, k, v, mask)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled (its fused kernel; uncompiled it is a slow reference), once."""
    return torch.compile(flex_attention, dynamic=True)


def use_cuda_attention(model, attend=cuda_attention):
    """Every Attention layer of `model` runs `attend` (default cuda_attention) from now on; returns
    the model. Called once at setup, never per step."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.attend = attend
    return model


def segment_block_mask(q_seg, q_col, k_seg, k_col):
    """scale.pack.segment_mask's rule as a FlexAttention BlockMask, built blockwise by the compiled
    builder on CUDA (uncompiled, create_block_mask materialises the dense (Tq, Tk) mask first)."""
    def visible(b, h, q, k):
        return (q_seg[b, q] == k_seg[b, k]) & (k_col[b, k] <= q_col[b, q])
    return create_block_mask(visible, q_seg.shape[0], None, q_seg.shape[1], k_seg.shape[1],
                             device=q_seg.device, _compile=q_seg.is_cuda)
