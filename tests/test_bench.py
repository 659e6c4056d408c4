"""bench.py's paper-size distill step, exercised (never timed) at a tiny size on CPU."""
import math

import pytest
import torch

import bench
from bench import SMOLLM2_360M
from model import SIGLIP2_B16_512, Decoder, vlm_from_teacher

KEYS = {"ms_per_step", "tokens_per_s", "tflop_per_step", "achieved_tflops", "mfu", "peak_mem_mib",
        "teacher_cont_ms", "teacher_full_ms", "cont_ratio", "ideal_ratio", "kv_mib", "loss",
        "n_student", "n_teacher"}


@pytest.mark.parametrize("amp,ckpt", [("fp32", False), ("bf16", True)])
def test_paper_bench_runs_one_tiny_step_and_returns_finite_numbers(amp, ckpt):
    r = bench.bench_paper(torch.device("cpu"), size="tiny", B=2, P=8, R=4, steps=1, warmup=0,
                          amp=amp, grad_ckpt=ckpt, kd_chunk=3, peak_tflops=1.0)
    assert KEYS <= r.keys()
    assert all(math.isfinite(r[k]) and r[k] >= 0 for k in KEYS), r
    assert r["ideal_ratio"] == 4 / 12 and r["kv_dtype"] == ("bfloat16" if amp == "bf16"
                                                            else "float32")
    assert r["teacher_dtype"] == r["kv_dtype"]
    rows = bench.paper_rows(r, "tiny", 2, 8, 4, 1.0)
    assert len(rows) == 2 and all(len(row) == 5 for row in rows)


def test_flop_count_covers_every_parameter_once_at_the_paper_shape():
    lm, vis = SMOLLM2_360M, SIGLIP2_B16_512
    with torch.device("meta"):                                          # shapes only, no memory
        teacher = Decoder(lm)
        student = vlm_from_teacher(teacher, vis, lm.vocab_size, shuffle_factor=4)
    assert student.n_image_tokens == 64 and student.decoder.cfg.vocab_size == 49153
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert 360e6 < n_t < 364e6                                          # SmolLM2-360M, tied
    # B=1, P=0, R=1: the blocks see P+R = 1 column, the head R+1 = 2, the vision tower every
    # patch, the projector every image token; body = every student parameter that is not the
    # (tied) head, the vision tower or the projector, so no parameter is missed or counted twice.
    f_s, f_t = bench.flops_per_step(student, teacher, B=1, P=0, R=1)
    body = n_s - student.decoder.lm_head.weight.numel() \
        - sum(p.numel() for p in student.vision.parameters()) \
        - sum(p.numel() for p in student.projector.parameters())
    assert f_t == 2 * n_t
    # + attention's QK^T and AV (x3 with the backward): 1 query x 1 key per decoder layer, every
    # patch x every patch per vision layer; the teacher's query has no key before it (P - 1 + R = 0)
    attention = 12 * lm.n_layers * lm.n_heads * lm.head_dim + 12 * vis.n_layers * vis.dim \
        * vis.n_patches ** 2
    assert f_s == 6 * (body + 2 * student.decoder.lm_head.weight.numel()
                       + sum(p.numel() for p in student.vision.parameters()) * vis.n_patches
                       + sum(p.numel() for p in student.projector.parameters()) * 64) + attention


def test_pack_bench_runs_at_a_tiny_size_and_packs_denser_than_padding():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # a busy 2-core machine: 2 threads run this 10x slower
    try:
        r = bench.bench_pack(torch.device("cpu"), size="tiny", B=4, max_len=700, steps=1,
                             n_batches=1)
    finally:
        torch.set_num_threads(threads)
    assert r["packed"]["real"] == r["padded"]["real"] > 0
    assert r["packed"]["fraction"] > r["padded"]["fraction"] and r["packed"]["fraction"] <= 1
    assert math.isfinite(r["speedup"]) and len(bench.pack_rows_table(r, "tiny", 4, 700)) == 2
    lengths = bench.pack_lengths(1000, 4)
    assert max(x["views"] for x in lengths) == 17 and min(x["views"] for x in lengths) == 0
