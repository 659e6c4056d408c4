"""The GPU forms of attention, proven equal to the CPU reference on the CPU (scale/cuda.py,
scale/pack.py):
masked attention with K/V repeated to the query heads (what CUDA runs, so that SDPA's fused
kernels take the mask) and packed rows' FlexAttention block masks (no (L, L) tensor).
tests/test_cuda.py runs them on a GPU with SDPA's math kernel disabled."""
import pytest
import torch

import data
import distill
from scale import cuda, pack
from test_pack import PAD, examples, models


def step(student, teacher, batch, w, scope):
    """Student and teacher logits, loss and the student's gradients of one distill step."""
    student.zero_grad()
    s, t = pack.handoff(student, teacher, batch, student.student_only_ids, scope)
    kd_weight = w[batch["token_example"]]                           # per token, either layout
    out = distill.distill_loss(s, batch["labels"], batch["response_mask"], t, kd_weight)
    out["loss"].backward()
    return [s, t, out["loss"]] + [p.grad.clone() for p in student.parameters()
                                  if p.grad is not None]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("scope", ["full", "image", "none"])
def test_repeated_kv_equals_gqa_forward_and_gradients(scope, layout):
    teacher, student = models()
    pairs, views, w = examples(student.n_image_tokens)
    batch = (pack.lay_out(pairs, views, PAD, 80) if layout == "packed"
             else data.lay_out(pairs, views, PAD))
    reference = step(student, teacher, batch, w, scope)
    cuda.use_cuda_attention(student)
    cuda.use_cuda_attention(teacher)
    repeated = step(student, teacher, batch, w, scope)
    assert len(reference) == len(repeated) > 3
    for a, b in zip(reference, repeated):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_repeated_kv_equals_gqa_in_cached_generation():
    teacher, _ = models()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                                   # a left-padded prompt
    reference = teacher.generate(ids, mask, max_new_tokens=6)
    cuda.use_cuda_attention(teacher)
    assert torch.equal(teacher.generate(ids, mask, max_new_tokens=6), reference)


@pytest.mark.parametrize("scope", ["full", "image", "none"])
def test_block_masks_give_the_dense_masks_logits(scope, monkeypatch):
    """The CUDA form of the packed masks (pack.segment_mask: a FlexAttention BlockMask, no
    (L, L) tensor) gives the dense reference's student and teacher logits. Forward only here:
    FlexAttention has no backward on the CPU; tests/test_cuda.py compares the gradients."""
    teacher, student = models()
    pairs, views, _ = examples(student.n_image_tokens)
    packed = pack.lay_out(pairs, views, PAD, 80)
    with torch.no_grad():
        dense = pack.handoff(student, teacher, packed, student.student_only_ids, scope)
        monkeypatch.setattr(pack, "BLOCK_MASKS", "always")
        assert not torch.is_tensor(pack.prefill_mask(packed["segment_ids"]))
        cuda.use_cuda_attention(student)       # the form that runs a BlockMask (as on CUDA)
        cuda.use_cuda_attention(teacher)
        block = pack.handoff(student, teacher, packed, student.student_only_ids, scope)
    for a, b in zip(dense, block):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
