"""CUDA paths (bf16 autocast, pinned memory, fused AdamW): run where a GPU is present, skipped
elsewhere."""
import pytest
import torch

import train
from train import get_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_smoke_pipeline_on_cuda_with_bf16_autocast(tmp_path):
    models, world, tok = train.run(get_config(["--preset=smoke", "--device=cuda",
                                               f"--out_dir={tmp_path}", "--eval=false"]))
    student = models["distilled-selective-full"]
    assert next(student.parameters()).device.type == "cuda"
    # master weights stay fp32 under autocast; the frozen teacher is held in bf16
    assert next(student.parameters()).dtype == torch.float32
    assert next(models["teacher"].parameters()).dtype == torch.bfloat16
    import eval as evaluation
    rows = evaluation.evaluate_models(models, world, tok, 32)
    assert all(0 <= v <= 1 for r in rows.values() for v in r.values())


def test_runtime_uses_fused_adamw_pinned_memory_and_bf16():
    rt = train.Runtime(get_config(["--device=cuda"]))
    batch = rt.to_device({"x": torch.ones(3), "s": ["a"]})
    assert batch["x"].device.type == "cuda" and batch["s"] == ["a"]
    with rt.autocast():
        y = torch.nn.Linear(4, 4).cuda()(torch.ones(2, 4, device="cuda"))
    assert y.dtype == torch.bfloat16


def test_distill_step_matches_between_cpu_fp32_and_cuda_fp32():
    from model import LMConfig, Decoder
    import kvshare
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False        # Runtime turns TF32 on for training speed
    lm = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64)
    teacher = kvshare.freeze(Decoder(lm))
    ids = torch.randint(1, 60, (2, 10))
    _, kv = teacher(ids, use_cache=True)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "context_len": 6,
             "labels": ids[:, 6:]}
    cpu = kvshare.teacher_continue(teacher, kv, batch, 63)
    teacher.cuda()
    gpu_batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    gpu = kvshare.teacher_continue(teacher, [(k.cuda(), v.cuda()) for k, v in kv], gpu_batch, 63)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
