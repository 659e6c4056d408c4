"""The source-selective KD objective (distill.py): the KD invariants README lists."""
import pytest
import torch
import torch.nn.functional as F

from distill import (DIVERGENCES, check_loss_inputs, distill_loss, kd_divergence, kd_token_sum,
                     source_weights, table_from_kinds)

TABLE = table_from_kinds({"text": "language", "tell": "language", "ocr": "vision",
                          "count": "vision"})


def make_batch(B=4, R=5, V=11, Vt=None, dtype=torch.float64, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, R, V, generator=g, dtype=dtype) * 2
    t = torch.randn(B, R, Vt or V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (B, R), generator=g)
    lengths = lengths or [R - (i % 3) for i in range(B)]
    mask = torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]        # (B, R) right-padded
    return s.requires_grad_(True), t, labels, mask


def checked_loss(s, labels, mask, t, kd_weight, **kw):
    """check_loss_inputs, then distill_loss; the token counts it divided by (n_ce_tokens,
    n_kd_tokens: the real tokens and the weighted KD tokens) are added to its output."""
    check_loss_inputs(s, labels, mask, t, kd_weight, kw.get("alpha", 1.0))
    out = distill_loss(s, labels, mask, t, kd_weight, **kw)
    return {**out, "n_ce_tokens": mask.sum(), "n_kd_tokens": (mask.float() * kd_weight).sum()}


def gated(s, labels, mask, t, *, sources, policy, table=None, **kw):
    """distill_loss with the source gate of `sources` under `policy` (source_weights), one
    weight per response token (each row's example's)."""
    w = source_weights(policy, sources, table)                                # (B,)
    return checked_loss(s, labels, mask, t, w[:, None].expand(-1, labels.shape[1]), **kw)


def explicit_kl(p, q):
    """sum p log(p / q), float64 probabilities (N, V) -> (N,)."""
    return (p * (p.log() - q.log())).sum(-1)


def test_kd_of_identical_distributions_is_zero():
    x = torch.randn(7, 13)
    for kind in DIVERGENCES:
        for T in (0.5, 1.0, 3.0):
            d = kd_divergence(x, x.clone(), kind, T)
            assert d.shape == (7,)
            torch.testing.assert_close(d, torch.zeros(7), atol=1e-6, rtol=0)


def test_kd_is_nonnegative():
    s, t = torch.randn(64, 17) * 3, torch.randn(64, 17) * 3
    for kind in DIVERGENCES:
        for T in (0.25, 1.0, 2.0, 5.0):
            d = kd_divergence(s, t, kind, T)
            assert (d >= -1e-6).all(), (kind, T, d.min())
            assert (d > 0).all(), (kind, T)      # different distributions -> strictly positive


def test_fkl_matches_explicit_formula():
    s, t = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                   reduction="none").sum(-1)
    torch.testing.assert_close(kd_divergence(s, t, "fkl"), ref)
    # fkl is the default
    torch.testing.assert_close(kd_divergence(s, t), explicit_kl(t.softmax(-1), s.softmax(-1)))


def test_rkl_and_jsd_formulas():
    s, t = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    ps, pt = s.softmax(-1), t.softmax(-1)
    torch.testing.assert_close(kd_divergence(s, t, "rkl"), explicit_kl(ps, pt))
    for beta in (0.5, 0.2, 0.9):
        m = beta * pt + (1 - beta) * ps
        ref = beta * explicit_kl(pt, m) + (1 - beta) * explicit_kl(ps, m)
        torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=beta), ref)
    # the convention's limits: JSD/beta -> fkl as beta -> 0, JSD/(1-beta) -> rkl as beta -> 1
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=1e-6) / 1e-6,
                               kd_divergence(s, t, "fkl"), rtol=1e-3, atol=0)
    torch.testing.assert_close(kd_divergence(s, t, "jsd", beta=1 - 1e-6) / 1e-6,
                               kd_divergence(s, t, "rkl"), rtol=1e-3, atol=0)


def test_temperature_scaling():
    s, t = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
    for kind in DIVERGENCES:
        for T in (0.5, 2.0, 4.0):
            torch.testing.assert_close(kd_divergence(s, t, kind, T),
                                       T ** 2 * kd_divergence(s / T, t / T, kind, 1.0))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_equals_unchunked(dtype, tol):
    s, t, _, mask = make_batch(B=3, R=7, V=19, dtype=dtype)
    weights = mask.to(dtype) * torch.tensor([1.0, 0.0, 0.5], dtype=dtype)[:, None]
    for kind in DIVERGENCES:
        full = kd_token_sum(s, t, weights, kind, 2.0)
        (g_full,) = torch.autograd.grad(full, s)
        for chunk in (1, 3, 4, 100):
            part = kd_token_sum(s, t, weights, kind, 2.0, chunk_size=chunk)
            (g_part,) = torch.autograd.grad(part, s)
            torch.testing.assert_close(part, full, rtol=tol, atol=tol)
            torch.testing.assert_close(g_part, g_full, rtol=tol, atol=tol)
            with torch.no_grad():                              # evaluation path: no checkpointing
                torch.testing.assert_close(kd_token_sum(s, t, weights, kind, 2.0, chunk_size=chunk),
                                           full.detach(), rtol=tol, atol=tol)
        assert full > 0 and g_full[1].abs().sum() == 0       # weight-0 example: no gradient at all


def test_all_masked_batch_gives_zero_kd_with_finite_grads():
    s, t, labels, mask = make_batch(B=2, R=4)
    none = torch.zeros_like(mask)
    for chunk in (None, 2):
        out = gated(s, labels, none, t, sources=["text", "ocr"], policy="uniform",
                    table=TABLE, chunk_size=chunk, kd_tokens=0)
        assert out["kd"].item() == 0.0 and out["ce"].item() == 0.0 and out["n_kd_tokens"] == 0
        out["loss"].backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0
        s.grad = None
    # real tokens, but every example is vision-heavy: KD exactly 0, CE still trains
    out = gated(s, labels, mask, t, sources=["ocr", "count"], policy="selective",
                table=TABLE)
    assert out["kd"].item() == 0.0 and out["ce"].item() > 0 and out["n_kd_tokens"] == 0
    out["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_zero_probabilities_give_finite_kd_and_grads():
    s, t = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    s[:, 6:], t[:, 6:] = float("-inf"), float("-inf")          # p = 0 for both on entries 6, 7
    s.requires_grad_(True)
    for kind in DIVERGENCES:
        d = kd_divergence(s, t, kind, 1.0)
        (g,) = torch.autograd.grad(d.sum(), s)
        assert torch.isfinite(d).all() and torch.isfinite(g).all(), kind
        torch.testing.assert_close(d, kd_divergence(s[:, :6], t[:, :6], kind, 1.0))


def test_kd_masks_padding_tokens():
    s, t, labels, mask = make_batch(B=3, R=6, lengths=[6, 3, 4])
    sources = ["text", "tell", "text"]
    ref = gated(s, labels, mask, t, sources=sources, policy="selective", table=TABLE,
                divergence="jsd")
    (g_ref,) = torch.autograd.grad(ref["loss"], s)
    s2, t2, labels2 = s.detach().clone(), t.clone(), labels.clone()
    pad = ~mask
    s2[pad], t2[pad], labels2[pad] = 1e4, -1e4, -7                            # garbage at pads
    s2.requires_grad_(True)
    out = gated(s2, labels2, mask, t2, sources=sources, policy="selective", table=TABLE,
                divergence="jsd")
    (g,) = torch.autograd.grad(out["loss"], s2)
    for k in ("loss", "ce", "kd"):
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    assert g[pad].abs().sum() == 0 and g[mask].abs().sum() > 0


def test_selective_gate_equals_kd_on_selected_examples_only():
    s, t, labels, mask = make_batch(B=4, R=5)
    sources = ["text", "ocr", "tell", "count"]
    mixed = gated(s, labels, mask, t, sources=sources, policy="selective", table=TABLE)
    keep = [0, 2]
    sub = gated(s[keep], labels[keep], mask[keep], t[keep],
                sources=[sources[i] for i in keep], policy="uniform")
    torch.testing.assert_close(mixed["kd"], sub["kd"])
    assert mixed["n_kd_tokens"] == sub["n_kd_tokens"] == float(mask[keep].sum())
    # vision-heavy examples get gradient from CE only: alpha changes nothing there
    (g1,) = torch.autograd.grad(gated(s, labels, mask, t, sources=sources,
                                      policy="selective", table=TABLE, alpha=1.0)["loss"], s)
    (g0,) = torch.autograd.grad(gated(s, labels, mask, t, sources=sources,
                                      policy="selective", table=TABLE, alpha=0.0)["loss"], s)
    torch.testing.assert_close(g1[[1, 3]], g0[[1, 3]], rtol=0, atol=0)
    assert (g1[keep] - g0[keep]).abs().sum() > 0


def test_uniform_and_none_policies():
    s, t, labels, mask = make_batch()
    sources = ["text", "ocr", "tell", "count"]
    assert source_weights("uniform", sources).tolist() == [1.0] * 4
    assert source_weights("none", sources).tolist() == [0.0] * 4
    assert source_weights("selective", sources, TABLE).tolist() == [1.0, 0.0, 1.0, 0.0]
    uniform = gated(s, labels, mask, t, sources=sources, policy="uniform")
    all_language = gated(s, labels, mask, t, sources=sources, policy="selective",
                         table={k: 1.0 for k in TABLE})
    torch.testing.assert_close(uniform["loss"], all_language["loss"])
    assert uniform["n_kd_tokens"] == float(mask.sum()) and uniform["kd"] > 0
    none = gated(s, labels, mask, None, sources=sources, policy="none")   # no teacher needed
    assert none["kd"].item() == 0.0 and none["n_kd_tokens"] == 0
    torch.testing.assert_close(none["loss"].detach(), uniform["ce"])
    ce = F.cross_entropy(s[mask], labels[mask])
    torch.testing.assert_close(none["ce"], ce.detach())


def test_kd_normaliser_is_weighted_token_count():
    s, t, labels, mask = make_batch(B=3, R=5, lengths=[5, 2, 4])
    table = {"a": 0.5, "b": 1.0, "c": 0.0}
    sources = ["a", "b", "c"]
    w = mask.double() * torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)[:, None]
    per_token = kd_divergence(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])).reshape(3, 5)
    out = gated(s, labels, mask, t, sources=sources, policy="selective", table=table)
    assert out["n_kd_tokens"] == 0.5 * 5 + 1.0 * 2 == float(w.sum())
    torch.testing.assert_close(out["kd"], ((w * per_token).sum() / w.sum()).detach())
    # explicit global normalisers (grad accumulation / DDP) replace the local counts, once
    glob = gated(s, labels, mask, t, sources=sources, policy="selective", table=table,
                 kd_tokens=10.0, ce_tokens=20.0)
    torch.testing.assert_close(glob["kd"], ((w * per_token).sum() / 10.0).detach())
    ce_sum = F.cross_entropy(s[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(glob["ce"], (ce_sum / 20.0).detach())
    torch.testing.assert_close(glob["loss"], glob["ce"] + glob["kd"])


def test_vocab_prefix_when_teacher_vocab_smaller():
    s, t, labels, mask = make_batch(V=12, Vt=8)
    sources = ["text"] * 4
    ref = gated(s, labels, mask, t, sources=sources, policy="uniform")
    sliced = kd_token_sum(s[..., :8], t, mask.double())
    torch.testing.assert_close(ref["kd"], (sliced / mask.sum()).detach())
    # student logits outside the shared prefix do not enter KD (they do enter CE)
    s2 = s.detach().clone()
    s2[..., 8:] += 5.0
    out2 = gated(s2, labels, mask, t, sources=sources, policy="uniform")
    torch.testing.assert_close(out2["kd"], ref["kd"])
    assert not torch.allclose(out2["ce"], ref["ce"])
    # and the other way round: a larger teacher vocab is sliced too
    student8, teacher12 = t[0], s[0].detach()                                   # (R, 8), (R, 12)
    torch.testing.assert_close(kd_divergence(student8, teacher12),
                               kd_divergence(student8, teacher12[:, :8]))
    assert not torch.allclose(kd_divergence(student8, teacher12),
                              kd_divergence(student8, teacher12[:, 4:]))


def test_fp32_softmax_with_bf16_inputs():
    s, t, labels, mask = make_batch(B=2, R=6, V=300, dtype=torch.float32)
    s16, t16 = s.detach().bfloat16(), t.bfloat16()
    for kind in DIVERGENCES:
        d16 = kd_divergence(s16.reshape(-1, 300), t16.reshape(-1, 300), kind, 2.0)
        d32 = kd_divergence(s16.float().reshape(-1, 300), t16.float().reshape(-1, 300), kind, 2.0)
        assert d16.dtype == torch.float32
        torch.testing.assert_close(d16, d32, rtol=0, atol=0)                # computed in float32
        ref = kd_divergence(s.detach().reshape(-1, 300), t.reshape(-1, 300), kind, 2.0)
        torch.testing.assert_close(d16, ref, rtol=0.05, atol=5e-3)          # ~ the fp32 result
    s16.requires_grad_(True)
    out = gated(s16, labels, mask, t16, sources=["text", "tell"], policy="uniform")
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    assert torch.isfinite(s16.grad.float()).all()


def test_teacher_gets_no_gradient():
    s, t, labels, mask = make_batch()
    t.requires_grad_(True)
    gated(s, labels, mask, t, sources=["text"] * 4, policy="uniform")["loss"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    s, t, labels, mask = make_batch(B=2, R=4)
    src = ["text", "ocr"]
    with pytest.raises(ValueError, match=r"student_logits.*\(2, 4, V\).*\(2, 3, 11\)"):
        gated(s[:, :3], labels, mask, t, sources=src, policy="uniform")
    with pytest.raises(ValueError, match=r"response_mask.*\(2, 5\)"):
        gated(s, labels, torch.ones(2, 5, dtype=torch.bool), t, sources=src,
              policy="uniform")
    with pytest.raises(ValueError, match=r"teacher_logits.*\(2, 3, 11\)"):
        gated(s, labels, mask, t[:, :3], sources=src, policy="uniform")
    with pytest.raises(ValueError, match=r"kd_weight must be \(B, R\) = \(2, 4\) per token.*found "
                                         r"\[\[1.0, 1.0, 1.0, 1.0\], \[1.0, 1.0, 1.0, 1.0\], "
                                         r"\[1.0, 1.0, 1.0, 1.0\]\]"):
        gated(s, labels, mask, t, sources=src + ["text"], policy="uniform")
    with pytest.raises(ValueError, match=r"needs teacher_logits"):
        gated(s, labels, mask, None, sources=src, policy="selective", table=TABLE)
    with pytest.raises(ValueError, match=r"policy='greedy'.*none.*uniform.*selective"):
        gated(s, labels, mask, t, sources=src, policy="greedy")
    with pytest.raises(ValueError,
                       match=r"\['caption'\] not in the KD weight table; known sources: \['count'"):
        source_weights("selective", ["text", "caption"], TABLE)
    with pytest.raises(ValueError, match=r"divergence='xkl'"):
        gated(s, labels, mask, t, sources=src, policy="uniform", divergence="xkl")
    with pytest.raises(ValueError, match=r"beta"):
        kd_divergence(s[0], t[0], "jsd", beta=1.0)
    with pytest.raises(ValueError, match=r"temperature"):
        kd_divergence(s[0], t[0], "fkl", temperature=0.0)
    with pytest.raises(ValueError, match=r"chunk_size"):
        kd_token_sum(s, t, mask.double(), chunk_size=0)
    # a KD count of 0 is no error any more (distill.mean_over): it leaves the sum, the loss stays
    # finite, and with no KD token the KD term is exactly 0
    zero = gated(s, labels, mask, t, sources=src, policy="uniform", kd_tokens=0)
    assert torch.isfinite(zero["loss"])
    torch.testing.assert_close(zero["kd"], kd_token_sum(s, t, mask.double()).detach())
    no_kd = gated(s, labels, mask, t, sources=src, policy="none", kd_tokens=0)
    assert torch.isfinite(no_kd["loss"]) and no_kd["kd"].item() == 0.0
    with pytest.raises(ValueError, match=r"source kinds.*'audio'"):
        table_from_kinds({"speech": "audio"})


def test_padding_invariance_of_kd_per_example():
    a_s, a_t, a_labels, a_mask = make_batch(B=1, R=3, lengths=[3], seed=1)
    b_s, b_t, b_labels, b_mask = make_batch(B=1, R=7, lengths=[6], seed=2)
    alone_a = gated(a_s, a_labels, a_mask, a_t, sources=["text"], policy="uniform",
                    divergence="rkl", temperature=2.0)
    alone_b = gated(b_s, b_labels, b_mask, b_t, sources=["text"], policy="uniform",
                    divergence="rkl", temperature=2.0)
    # batch A with the longer B: A gets 4 extra columns of garbage logits and mask 0
    g = torch.Generator().manual_seed(3)
    garbage = lambda x: torch.cat([x.detach(),
                                   50 * torch.randn(1, 4, x.shape[-1], generator=g, dtype=x.dtype)],
                                  1)
    s = torch.cat([garbage(a_s), b_s.detach()]).requires_grad_(True)
    t = torch.cat([garbage(a_t), b_t])
    labels = torch.cat([torch.cat([a_labels, torch.full((1, 4), 99)], 1), b_labels])
    mask = torch.cat([torch.cat([a_mask, torch.zeros(1, 4, dtype=torch.bool)], 1), b_mask])
    both = gated(s, labels, mask, t, sources=["text", "text"], policy="uniform",
                 divergence="rkl", temperature=2.0)
    n_a, n_b = alone_a["n_kd_tokens"], alone_b["n_kd_tokens"]
    assert both["n_kd_tokens"] == n_a + n_b == 9
    torch.testing.assert_close(both["kd"],
                               (n_a * alone_a["kd"] + n_b * alone_b["kd"]) / (n_a + n_b))
    # A's own KD term, read out of the batch by weighting only its row, equals A alone
    only_a = kd_token_sum(s, t, mask.double() * torch.tensor([[1.0], [0.0]], dtype=torch.float64),
                          "rkl", 2.0)
    torch.testing.assert_close(only_a / n_a, alone_a["kd"])


@pytest.mark.parametrize("kw,message", [
    (dict(alpha=-0.5), "alpha must be a finite number >= 0, found -0.5"),
    (dict(alpha=float("nan")), "alpha must be a finite number >= 0, found nan"),
    (dict(temperature=0.0), "temperature must be > 0, found 0.0"),
    (dict(temperature=-1.0), "temperature must be > 0, found -1.0"),
    (dict(divergence="jsd", beta=0.0), "jsd needs 0 < beta < 1, found beta=0.0"),
    (dict(divergence="jsd", beta=1.5), "jsd needs 0 < beta < 1, found beta=1.5"),
])
def test_distill_loss_refuses_bad_alpha_temperature_and_beta(kw, message):
    s, t, labels, mask = make_batch(B=2, R=4)
    with pytest.raises(ValueError) as e:
        gated(s, labels, mask, t, sources=["text", "ocr"], policy="uniform", **kw)
    assert str(e.value) == message


@pytest.mark.parametrize("bad", [-1, 11])
def test_distill_loss_refuses_labels_outside_the_vocabulary(bad):
    s, t, labels, mask = make_batch(B=2, R=4)                # vocabulary 11
    labels = labels.clone()
    labels[1, 0] = bad
    mask = mask.clone()
    mask[1, 0] = True
    with pytest.raises(ValueError) as e:
        gated(s, labels, mask, t, sources=["text", "ocr"], policy="uniform")
    assert str(e.value).startswith("labels must be token ids in [0, 11) (the student's "
                                   "vocabulary), found ")
    labels[1, 0], mask[1, 0] = bad, False                  # a pad label is never read
    gated(s, labels, mask, t, sources=["text", "ocr"], policy="uniform")


def test_kd_weight_per_token_equals_per_example_and_checks_its_shape():
    s, t, labels, mask = make_batch(B=3, R=4)
    w = torch.tensor([1.0, 0.0, 0.5])
    token_example = torch.arange(3)[:, None].expand(3, 4)     # data.pad_pairs: each token's row
    a = checked_loss(s, labels, mask, t, kd_weight=w[token_example])   # per example, gathered
    b = checked_loss(s, labels, mask, t, kd_weight=w[:, None].expand(3, 4))   # packed batches
    assert a["n_kd_tokens"] == b["n_kd_tokens"] and torch.equal(a["loss"], b["loss"])
    with pytest.raises(ValueError, match=r"kd_weight must be \(B, R\) = \(3, 4\) per token"):
        checked_loss(s, labels, mask, t, kd_weight=torch.ones(3, 5))
