"""Generation on a preallocated cache (scale/decode.py, the GPU form) equals the reference
model.Decoder.generate: each step's logits, and the tokens of greedy, sampled, eos-stopped,
image-conditioned and handoff-prefixed generations; the cache is allocated once, in the compute
dtype, and written in place."""
import pytest
import torch

from model import VLM, Decoder, LMConfig, VisionConfig
from scale import decode


def lm(n_kv_heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96)
    return Decoder(LMConfig(**{**cfg, **kw})).eval()


def prompts():
    ids = torch.randint(1, 97, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                          # left-padded prompts
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])          # MQA, GQA, MHA
def test_every_step_gives_the_reference_forwards_logits(n_kv_heads):
    model = lm(n_kv_heads)
    ids, mask = prompts()
    new = torch.randint(1, 97, (3, 5))                      # tokens appended one at a time
    with torch.no_grad():
        _, kv = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = decode.StaticCache(kv, mask, max_new_tokens=5)
        full_mask = torch.cat([mask, torch.ones_like(new)], 1)
        reference, _ = model(input_ids=torch.cat([ids, new], 1), attention_mask=full_mask)
        for i in range(5):
            step = cache.step(model, new[:, i])
            torch.testing.assert_close(step, reference[:, 7 + i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_k=5),
                                dict(temperature=1.0), dict(eos_id=3, pad_id=0)],
                         ids=["greedy", "top_k", "sampled", "eos"])
def test_static_generate_gives_the_reference_tokens(kw):
    model = lm()
    ids, mask = prompts()
    run = dict(max_new_tokens=12, **kw)
    gen = lambda: torch.Generator().manual_seed(1)                          # noqa: E731
    reference = model.generate(ids, mask, generator=gen(), **run)
    streamed = []
    decode.use_static_cache(model)
    assert model.generate.__func__ is decode.static_generate
    out = model.generate(ids, mask, generator=gen(), on_token=streamed.append, **run)
    assert torch.equal(out, reference)
    assert torch.equal(torch.stack(streamed, 1), out[:, :len(streamed)])


def test_eos_rows_are_padded_and_the_generation_stops_early():
    model = lm()
    ids, mask = prompts()
    first = model.generate(ids, mask, max_new_tokens=1)[:, 0]
    eos = int(first[0])                                      # row 0 ends at once
    reference = model.generate(ids, mask, max_new_tokens=8, eos_id=eos, pad_id=0)
    decode.use_static_cache(model)
    out = model.generate(ids, mask, max_new_tokens=8, eos_id=eos, pad_id=0)
    assert torch.equal(out, reference) and (out[0, 1:] == 0).all()


def test_a_vlm_generates_the_same_tokens_from_images():
    torch.manual_seed(0)
    vis = VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=4, mlp_dim=64)
    vlm = VLM(LMConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96),
              vis, image_token_id=60).eval()
    n = vlm.n_image_tokens
    ids = torch.cat([torch.full((2, n), 60), torch.randint(1, 59, (2, 4))], 1)
    images = torch.randn(2, 3, 16, 16)
    reference = vlm.generate(ids, images, max_new_tokens=8)
    decode.use_static_cache(vlm)
    assert torch.equal(vlm.generate(ids, images, max_new_tokens=8), reference)


def test_a_prefix_in_the_cache_as_the_teacher_after_the_handoff():
    """past_kv (tools/generate.py's teacher_generate: the student's context K/V, the teacher then
    re-runs the last context token): the same tokens."""
    student, teacher = lm(seed=1), lm(seed=2)
    ids, mask = prompts()
    with torch.no_grad():
        _, kv = student(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    reference = teacher.generate(ids[:, -1:], mask, max_new_tokens=6, past_kv=kv)
    decode.use_static_cache(teacher)
    assert torch.equal(teacher.generate(ids[:, -1:], mask, max_new_tokens=6, past_kv=kv),
                       reference)


def test_the_cache_is_allocated_once_in_the_compute_dtype():
    model = lm()
    ids, mask = prompts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, kv = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = decode.StaticCache(kv, mask, max_new_tokens=4)
        buffers = [t.data_ptr() for t in cache.k + cache.v]
        for i in range(4):
            logits = cache.step(model, ids[:, i])
    assert kv[0][0].dtype == torch.bfloat16                    # the prefill's K/V: bf16
    assert all(t.dtype == torch.bfloat16 and t.shape[2] == 7 + 4 for t in cache.k + cache.v)
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers     # written in place
    assert cache.column == 11 and torch.isfinite(logits.float()).all()


def test_a_generation_past_max_positions_is_refused_before_it_starts():
    model = lm(max_positions=12)
    ids, mask = prompts()
    decode.use_static_cache(model)
    with pytest.raises(ValueError, match="max_positions 12"):
        model.generate(ids, mask, max_new_tokens=8)
    assert model.generate(ids, mask, max_new_tokens=6).shape == (3, 6)   # 7 + 6 - 1 = 12 fits
