"""The handoff across RoPE bases (scale/rope.py: rebase_rope_k): K stored after the student's RoPE,
re-rotated to the teacher's base, is the K the teacher's RoPE gives; a teacher reading a
re-based copy of itself continues exactly as its own full forward; different bases without
--rebase_rope are refused with a message that names the option."""
from dataclasses import replace

import pytest
import torch

from scale import pack
from scale import rope
from scale.rope import rebase_rope_k, rebase_rope_kv
from kvshare import check_compatible, freeze, teacher_continue
from model import LMConfig, Decoder, apply_rope, positions_from_mask, rope_cos_sin
from test_kvshare import make_batch, rand_tokens

LM = LMConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
              rope_theta=10000.0, max_positions=4096)
STUDENT_THETA = 273768.0          # SmolVLM's long-context base (its paper), vs SmolLM2's 10k / 100k


@pytest.mark.parametrize("theta_from,theta_to", [(STUDENT_THETA, 10000.0), (10000.0, 1e6),
                                                 (5e5, 5e5)])
def test_rebased_k_equals_k_from_the_teachers_rope(theta_from, theta_to):
    B, H, T, hd = 2, 3, 40, 16
    k0 = torch.randn(B, H, T, hd)                                        # K before RoPE
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0                                                      # a left-padded row
    positions = positions_from_mask(mask) * 50                          # up to ~2000
    stored = apply_rope(k0, *rope_cos_sin(positions, hd, theta_from, torch.float32))
    teachers = apply_rope(k0, *rope_cos_sin(positions, hd, theta_to, torch.float32))
    torch.testing.assert_close(rebase_rope_k(stored, positions, hd, theta_from, theta_to),
                               teachers, atol=2e-5, rtol=0)
    if theta_from != theta_to:
        assert (stored - teachers).abs().max() > 0.1                     # the bases do differ


def random_teacher(n_layers):
    teacher = Decoder(replace(LM, n_layers=n_layers))
    with torch.no_grad():                        # every weight random: logits far from uniform
        for p in teacher.parameters():
            p.normal_(std=0.3)
    return freeze(teacher)


def copy_with_base(decoder, theta):
    """The same decoder (same weights) with another RoPE base."""
    other = Decoder(replace(decoder.cfg, rope_theta=theta))
    other.load_state_dict(decoder.state_dict())
    return other.eval()


def teacher_batch(packed):
    """A left-padded batch and, with packed, the same examples packed into one row; with the
    teacher's expected logits taken from its full forward over the padded batch."""
    lens = [(7, 4), (4, 2)]
    batch = make_batch([rand_tokens(c) for c, _ in lens], [rand_tokens(r) for _, r in lens])
    if not packed:
        return batch, lambda full: full[:, batch["context_len"] - 1:-1][batch["response_mask"]]
    P = batch["context_len"]
    pairs = [(batch["input_ids"][i, P - c:P].tolist(), batch["input_ids"][i, P:P + r].tolist())
             for i, (c, r) in enumerate(lens)]
    return ({**pack.pack(pairs, 0, 16), "images": None, "padded": batch},
            lambda full: torch.cat([full[i, P - 1:P - 1 + r] for i, (_, r) in enumerate(lens)]))


def response_logits(logits, batch):
    return logits[0] if "segment_ids" in batch else logits[batch["response_mask"]]


@pytest.mark.parametrize("packed", [False, True])
def test_teacher_over_its_own_kv_stored_at_another_base_equals_its_full_forward(packed):
    """Identity case: the shared K/V are the teacher's own, stored with the student's RoPE base
    (as a student whose pre-RoPE K equals the teacher's stores them). Re-based to the teacher's
    base, the continuation is the teacher's full forward; read as they are, it is not."""
    teacher = random_teacher(2)
    batch, expected = teacher_batch(packed)
    padded = batch.get("padded", batch)
    full, _ = teacher(padded["input_ids"], attention_mask=padded["attention_mask"])
    if packed:
        _, own = pack.PackedRows(teacher)(batch["input_ids"],
                                          pack.prefill_mask(batch["segment_ids"]),
                                          batch["position_ids"], batch["logit_index"],
                                          use_cache=True)
        positions = batch["position_ids"]
        continue_ = lambda t, kv, b, ids: pack.teacher_continue(  # noqa: E731  the same contract
            pack.PackedRows(t), kv, b, ids, "full")
    else:
        _, own = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
        positions = positions_from_mask(batch["attention_mask"])
        continue_ = teacher_continue
    stored = rebase_rope_kv(own, positions, LM.rope_theta, STUDENT_THETA)     # the student's base
    got = continue_(teacher, rebase_rope_kv(stored, positions, STUDENT_THETA, LM.rope_theta),
                    batch, ())
    torch.testing.assert_close(response_logits(got, batch), expected(full), atol=1e-4, rtol=0)
    wrong = continue_(teacher, stored, batch, ())
    assert (response_logits(wrong, batch) - expected(full)).abs().max() > 0.01


@pytest.mark.parametrize("packed", [False, True])
def test_rebased_rope_student_with_another_base(packed):
    """Through rope.RebasedRoPE(student, the student's base, the teacher's), with a one-layer
    student that is the teacher with another RoPE base (its one layer's K/V come straight from the
    shared embeddings, so they are the teacher's once re-based): the teacher's logits equal its
    full forward. Different bases without rebase_rope are refused by check_compatible, with the
    option named."""
    teacher = random_teacher(1)
    student = copy_with_base(teacher, STUDENT_THETA)
    with pytest.raises(ValueError, match=r"rope_theta: teacher 10000.0 vs student 273768.0 "
                                         r"\(--rebase_rope=true"):
        check_compatible(teacher.cfg, student.cfg)
    check_compatible(teacher.cfg, student.cfg, rebase_rope=True)            # accepted with it
    batch, expected = teacher_batch(packed)
    padded = batch.get("padded", batch)
    full, _ = teacher(padded["input_ids"], attention_mask=padded["attention_mask"])
    rows = pack.PackedRows(student) if packed else student
    rebased = rope.RebasedRoPE(rows, student.cfg.rope_theta, teacher.cfg.rope_theta)
    with torch.no_grad():        # packed: RebasedRoPE(PackedRows(student)), as train.py wraps it
        _, got = pack.handoff(rebased, teacher, batch, (), "full")
        _, wrong = pack.handoff(student, teacher, batch, (), "full")
    torch.testing.assert_close(response_logits(got, batch), expected(full), atol=1e-4, rtol=0)
    assert (response_logits(wrong, batch) - expected(full)).abs().max() > 0.01


def test_same_base_is_a_no_op():
    teacher = freeze(Decoder(LM))
    batch = make_batch([rand_tokens(5)], [rand_tokens(3)])
    _, kv = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
    positions = positions_from_mask(batch["attention_mask"])
    assert rebase_rope_kv(kv, positions, 10000.0, 10000.0) is kv
