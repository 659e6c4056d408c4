"""CE and KD from one student normaliser (scale/fused_loss.py, --fused_loss=true) equal the
reference distill.distill_loss: loss, CE, KD and gradients, on loss inputs of every shape the step
makes (student-only ids after the shared vocabulary, gate weights of 0, chunks, -inf teacher
logits, no KD token) and on a whole distill micro-batch as train.py sets it up, padded and packed,
with no value-dependent shape."""
import pytest
import torch

import data
import distill
import train
from model import Decoder
from scale.fused_loss import fused_distill_loss
from test_no_sync import ValueDependentOps


def inputs(B=3, R=5, Vs=23, Vt=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(B, R, Vs, generator=g)).requires_grad_(True)
    t = 3 * torch.randn(B, R, Vt, generator=g)
    t[0, 0, 4] = float("-inf")                                  # a masked teacher entry
    labels = torch.randint(0, Vs, (B, R), generator=g)
    real = torch.rand(B, R, generator=g) > 0.2
    gate = torch.tensor([[1.0], [0.0], [0.5]]).expand(B, R)     # per example, one without KD
    return s, labels, real, t, gate


def both(s, labels, real, t, gate, **kw):
    out = []
    for loss_fn in (distill.distill_loss, fused_distill_loss):
        s.grad = None
        r = loss_fn(s, labels, real, t, gate, **kw)
        r["loss"].backward()
        out.append([r["loss"], r["ce"], r["kd"], s.grad.clone()])
    return out


@pytest.mark.parametrize("chunk_size", [None, 2, 1000])
@pytest.mark.parametrize("Vs", [20, 23])                         # no / three student-only ids
def test_equal_to_the_reference_loss_and_gradients(chunk_size, Vs):
    s, labels, real, t, gate = inputs(Vs=Vs)
    index = dict(ce_index=data.flat_index(real), kd_index=data.flat_index(real & (gate > 0)))
    for kw in (dict(), dict(alpha=0.3, ce_tokens=40.0, kd_tokens=17.0, **index)):
        reference, fused = both(s, labels, real, t, gate, chunk_size=chunk_size, **kw)
        for a, b in zip(reference, fused):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_no_kd_token_and_no_token_at_all():
    s, labels, real, t, gate = inputs()
    reference, fused = both(s, labels, real, t, torch.zeros_like(gate))
    assert fused[2] == 0 and reference[2] == 0
    torch.testing.assert_close(fused[0], reference[0])
    reference, fused = both(s, labels, torch.zeros_like(real), t, gate)
    assert fused[0] == 0 and reference[0] == 0 and (fused[3] == 0).all()


def test_what_it_does_not_compute_is_refused():
    s, labels, real, t, gate = inputs()
    for kw in (dict(divergence="rkl"), dict(temperature=2.0)):
        with pytest.raises(ValueError, match="forward KL at temperature 1"):
            fused_distill_loss(s, labels, real, t, gate, **kw)
    for flags in (["--kd=jsd"], ["--temperature=2"], ["--policy=none"]):
        with pytest.raises(ValueError, match="--fused_loss=true"):
            train.get_config(["--fused_loss=true"] + flags)


def micro_batch_step(tmp_path, packed, fused):
    cfg = train.get_config(["--preset=smoke", f"--out_dir={tmp_path}", f"--pack={packed}",
                            f"--fused_loss={fused}"])
    world, tok = train.build_data_and_tokenizer(cfg)
    setup = train.TrainingSetup(cfg, train.Devices("cpu"), world, tok)
    torch.manual_seed(0)
    teacher = Decoder(train.lm_config(cfg, tok))
    student = train.initial_student(cfg, teacher, tok)
    model, step_fn, args = train.distill_setup(setup, teacher, student)
    micro_batches = next(train.stage_batches(setup, "distill", student, 0, args))
    counts = train.token_counts(micro_batches)
    assert counts["kd"] > 0 and counts["ce"] > counts["kd"]        # some rows without KD
    with ValueDependentOps() as mode:
        out = step_fn(model, micro_batches[0], counts, args)
    assert mode.found == [], f"value-dependent ops in the step: {sorted(set(mode.found))}"
    grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    return step_fn, [out["loss"], out["ce"], out["kd"]] + grads


@pytest.mark.parametrize("packed", [False, True])
def test_a_distill_micro_batch_as_train_py_runs_it(tmp_path, packed):
    step_ref, reference = micro_batch_step(tmp_path / "ref", packed, False)
    step_fused, fused = micro_batch_step(tmp_path / "fused", packed, True)
    assert step_fused is train.variant_step and len(fused) == len(reference) > 3
    for a, b in zip(reference, fused):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
