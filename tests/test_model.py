"""Decoder / vision / VLM invariants (README, Tests)."""
import pytest
import torch

from bench import SMOLLM2_360M
from model import (LMConfig, VisionConfig, Decoder, VLM, VisionEncoder, Attention,
                   pixel_shuffle, positions_from_mask, build_attention_mask, rope_cos_sin,
                   apply_rope)


def tiny_lm(**kw):
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    cfg.update(kw)
    return Decoder(LMConfig(**cfg)).eval()


def test_cached_prefill_plus_steps_equals_uncached_forward():
    m = tiny_lm()
    ids = torch.randint(0, 97, (2, 12))
    full, _ = m(ids)
    logits, kv = m(ids[:, :5], use_cache=True)
    steps = [logits]
    for t in range(5, 12):
        mask = torch.ones(2, t + 1, dtype=torch.long)
        logits, kv = m(ids[:, t:t + 1], attention_mask=mask, past_kv=kv, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_returned_kv_covers_past_and_new_positions_with_rope_applied():
    m = tiny_lm()
    ids = torch.randint(0, 97, (1, 7))
    _, kv = m(ids, use_cache=True)
    assert len(kv) == 2 and kv[0][0].shape == (1, 2, 7, 16)
    # K is post-RoPE: the same token at two positions gives different keys, V does not change.
    same = torch.full((1, 2), 5)
    _, kv = m(same, use_cache=True)
    assert not torch.allclose(kv[0][0][:, :, 0], kv[0][0][:, :, 1])
    torch.testing.assert_close(kv[0][1][:, :, 0], kv[0][1][:, :, 1])


def test_left_padding_does_not_change_an_examples_logits():
    m = tiny_lm()
    ids = torch.randint(1, 97, (1, 6))
    alone, _ = m(ids)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1).long()
    batched, _ = m(torch.cat([padded, torch.randint(1, 97, (1, 10))]),
                   attention_mask=torch.cat([mask, torch.ones(1, 10).long()]))
    torch.testing.assert_close(batched[0, 4:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


def test_gqa_equals_full_attention_with_repeated_kv_heads():
    gqa = tiny_lm(n_heads=4, n_kv_heads=2)
    mha = tiny_lm(n_heads=4, n_kv_heads=4)
    sd = gqa.state_dict()
    for i in range(2):
        for p in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.attn.{p}.weight"].view(2, 16, 64)
            sd[f"layers.{i}.attn.{p}.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(gqa(ids)[0], mha(ids)[0], atol=1e-5, rtol=1e-5)


def repeat_kv_attention(attn, x, cos, sin, mask, past_kv=None):
    """The reference GQA formulation: K/V heads copied n_heads / n_kv_heads times, then SDPA with
    an explicit boolean mask (mask None: the plain causal mask)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past_kv is not None:
        k, v = torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    groups = attn.n_heads // attn.n_kv_heads
    y = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


@pytest.mark.parametrize("past_len", [0, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_gqa_attention_equals_the_repeated_kv_formulation(past_len, padded):
    torch.manual_seed(0)
    attn = Attention(LMConfig(vocab_size=97, dim=96, n_layers=1, n_heads=6, n_kv_heads=2,
                              ffn_dim=128))
    B, T = 2, 5
    att = torch.ones(B, past_len + T, dtype=torch.long)
    if padded:
        att[0, :3] = 0                                              # left padding in row 0
    pos = positions_from_mask(att)[:, past_len:]
    cos, sin = rope_cos_sin(pos, 16, 10000.0, torch.float32)
    past = (torch.randn(B, 2, past_len, 16), torch.randn(B, 2, past_len, 16)) if past_len else None
    masks = [build_attention_mask(att, T, past_len)]
    if not padded and not past_len:
        masks.append(None)                                          # the is_causal path
    for mask in masks:
        x = torch.randn(B, T, 96, requires_grad=True)
        y, (k, v) = attn(x, cos, sin, mask, past)
        y_ref, (k_ref, v_ref) = repeat_kv_attention(attn, x, cos, sin, mask, past)
        assert k.shape == (B, 2, past_len + T, 16)                  # K/V stay un-expanded
        for a, b in ((y, y_ref), (k, k_ref), (v, v_ref)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        g, = torch.autograd.grad(y.square().sum(), x)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_no_mask_is_causal_path_equals_the_explicit_all_ones_mask():
    """attention_mask=None and no past: SDPA is_causal=True, no (B, 1, T, T) mask; the logits,
    KV and grads equal those of the explicit all-ones mask (the masked path)."""
    m = tiny_lm(n_heads=4, n_kv_heads=2)
    ids = torch.randint(0, 97, (3, 11))
    out = {}
    for name, att in (("causal", None), ("masked", torch.ones(3, 11, dtype=torch.long))):
        m.zero_grad()
        logits, kv = m(ids, attention_mask=att, use_cache=True)
        logits.square().mean().backward()
        out[name] = (logits.detach(), [k.detach() for k, _ in kv],
                     [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(out["causal"][0], out["masked"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["causal"][1], out["masked"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["causal"][2], out["masked"][2], atol=1e-5, rtol=1e-5)


def test_left_padded_batched_generation_equals_generating_each_prompt_alone():
    m = tiny_lm()
    a, b = torch.randint(1, 97, (1, 3)), torch.randint(1, 97, (1, 7))
    alone = [m.generate(x, max_new_tokens=6) for x in (a, b)]
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = (torch.arange(7)[None] >= torch.tensor([[4], [0]])).long()
    batched = m.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(batched[0], alone[0][0]) and torch.equal(batched[1], alone[1][0])


def test_generation_stops_at_eos_and_pads_after():
    m = tiny_lm()
    ids = torch.randint(1, 97, (1, 4))
    free = m.generate(ids, max_new_tokens=5)
    eos = int(free[0, 1])
    out = m.generate(ids, max_new_tokens=5, eos_id=eos, pad_id=-1)
    first = int((out[0] == eos).nonzero()[0])
    assert first <= 1 and (out[0, first + 1:] == -1).all()


def test_attention_mask_has_no_empty_rows_and_is_causal():
    att = torch.tensor([[0, 0, 1, 1, 1]])
    mask = build_attention_mask(att, q_len=3, past_len=2)
    assert mask.shape == (1, 1, 3, 5)
    assert mask.any(-1).all()
    assert mask[0, 0].tolist() == [[False, False, True, False, False],
                                   [False, False, True, True, False],
                                   [False, False, True, True, True]]
    assert positions_from_mask(att).tolist() == [[0, 0, 0, 1, 2]]


def test_pixel_shuffle_groups_spatial_neighbours():
    x = torch.arange(16.).view(1, 16, 1)                 # 4x4 grid, value = patch index
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]


def test_vlm_scatters_image_features_into_placeholders():
    lm, vis = LMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                       ffn_dim=64), VisionConfig()
    vlm = VLM(lm, vis, image_token_id=3).eval()
    ids = torch.cat([torch.full((1, vlm.n_image_tokens), 3), torch.randint(4, 50, (1, 3))], 1)
    images = torch.randn(1, 3, 32, 32)
    emb = vlm.embed(ids, images)
    feats = vlm.projector(vlm.vision(images))
    torch.testing.assert_close(emb[0, :vlm.n_image_tokens], feats[0])
    torch.testing.assert_close(emb[0, vlm.n_image_tokens:],
                               vlm.decoder.embed(ids[:, vlm.n_image_tokens:])[0])
    other = vlm.embed(ids, torch.randn(1, 3, 32, 32))
    assert not torch.allclose(other[0, 0], emb[0, 0])


def test_vlm_placeholder_feature_count_mismatch_is_a_clear_error():
    vlm = VLM(LMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
              VisionConfig(), 3)
    ids = torch.full((1, 5), 3)
    with pytest.raises(ValueError, match="5 image placeholder tokens .* 16 image features"):
        vlm.check_image_slots(ids, torch.randn(1, 3, 32, 32))   # on the host, before any work
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 32, 32\)"):
        VisionEncoder(VisionConfig())(torch.randn(1, 3, 16, 16))


def test_real_shapes_and_config_errors():
    c = SMOLLM2_360M
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim,
            c.vocab_size) == (32, 960, 15, 5, 64, 49152)
    with pytest.raises(ValueError, match="must divide"):
        LMConfig(dim=100, n_heads=3)


def test_tied_and_untied_heads():
    tied, untied = tiny_lm(tie_embeddings=True), tiny_lm(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight


def test_kv_comes_out_in_the_compute_dtype_bf16_under_autocast_fp32_without():
    # RoPE tables follow q/k's dtype: under bf16 autocast K (after RoPE) is bf16 like V, so the
    # KV shared with the teacher is half the size of fp32; without autocast everything stays fp32.
    m = tiny_lm()
    ids = torch.randint(0, 97, (2, 6))
    _, kv = m(ids, use_cache=True)
    assert all(k.dtype == v.dtype == torch.float32 for k, v in kv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, kv = m(ids, use_cache=True)
        assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in kv)
        logits, kv2 = m(ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), past_kv=kv,
                        use_cache=True)
    assert all(k.dtype == v.dtype == torch.bfloat16 and k.shape[2] == 7 for k, v in kv2)
    assert torch.isfinite(logits.float()).all()


def test_gradient_checkpointing_gives_the_same_loss_kv_and_grads():
    import copy
    plain = VLM(LMConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64),
                VisionConfig(), 3)
    ckpt = copy.deepcopy(plain)
    ckpt.decoder.gradient_checkpointing = True
    ids = torch.cat([torch.full((2, plain.n_image_tokens), 3), torch.randint(4, 50, (2, 5))], 1)
    images = torch.randn(2, 3, 32, 32)
    out = {}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        logits, kv = m(ids, images, use_cache=True, logits_start=4)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 ids[:, 4:].flatten()) + kv[-1][0].square().mean()
        loss.backward()
        out[name] = (loss.detach(), [k.detach() for k, _ in kv],
                     {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(out["ckpt"][0], out["plain"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["ckpt"][1], out["plain"][1], atol=1e-6, rtol=1e-6)
    assert out["plain"][2].keys() == out["ckpt"][2].keys()
    for n, g in out["plain"][2].items():
        torch.testing.assert_close(out["ckpt"][2][n], g, atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():                                      # no grad: plain forward, same output
        torch.testing.assert_close(ckpt(ids, images)[0], plain(ids, images)[0], atol=1e-6,
                                   rtol=1e-6)
