"""Throughput in the log: real tokens/s in every log.jsonl record and the progress bar; on CUDA
the MFU from plumbing/flops.py, the formula tools/bench.py uses (attention included)."""
import json

import torch

import train
from model import Decoder, LMConfig, VisionConfig, vlm_from_teacher
from plumbing import flops


def test_every_record_has_tokens_per_second(tmp_path):
    train.run(train.get_config(["--preset=smoke", f"--out_dir={tmp_path}", "--eval=false"]))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {r["stage"] for r in records} == {"pretrain", "align", "adapt",
                                            "distill-selective-full"}
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert all("mfu" not in r for r in records)                 # the CPU has no known peak


def test_batch_flops_of_each_stage_from_its_shapes(tmp_path):
    cfg = train.get_config(["--preset=smoke", f"--out_dir={tmp_path}"])
    world, tok = train.build_data_and_tokenizer(cfg)
    setup = train.TrainingSetup(cfg, train.Devices("cpu"), world, tok)
    setup.text_stream = train.data.encode_corpus(world.corpus, tok)
    teacher = Decoder(train.lm_config(cfg, tok))
    student = train.initial_student(cfg, teacher, tok)
    text = train.text_batch(setup, 0, 0)
    B, L = text["tokens"][:, :-1].shape
    f1 = flops.batch_flops(teacher, None, text)
    body, head = flops.body_and_head(teacher)
    c = teacher.cfg
    assert f1 == 3 * (2 * (body + head) * B * L + 4 * c.n_layers * c.n_heads * c.head_dim * B * L * L)
    _, step_fn, args = train.distill_setup(setup, teacher, student)
    batch = next(train.stage_batches(setup, "distill", student, 0, args))[0]
    f2, f3 = flops.batch_flops(student, None, batch), flops.batch_flops(student, teacher, batch)
    assert 0 < f2 < f3                                      # stage 2 vs 3: + the teacher's forward


def test_distill_step_flops_grow_with_the_context_and_peaks_by_name():
    lm, vis = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64), \
        VisionConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2, mlp_dim=32)
    teacher = Decoder(lm)
    student = vlm_from_teacher(teacher, vis, 63)
    s1, t1 = flops.distill_step_flops(student, teacher, 2, 8, 4)
    s2, t2 = flops.distill_step_flops(student, teacher, 2, 16, 4)
    assert s2 > s1 > 0 and t2 > t1 > 0          # longer context: more keys for the teacher too
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA L40S") == 362.0 and flops.peak_tflops("NVIDIA L4") == 121.0
    assert flops.peak_tflops("a CPU") is None
