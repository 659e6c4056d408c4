"""CUDA paths, run where a GPU is present (skipped elsewhere): bf16 autocast, pinned memory and
fused AdamW; every attention call of training and generation on a fused kernel (SDPA's math
kernel disabled, so a silent fallback to it fails the test); packed rows' FlexAttention equal to
the dense reference, gradients included; no host sync between the student prefill and the
teacher continuation. tests/test_gpu_paths.py proves the same forms equal on the CPU."""
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import kvshare
from plumbing.devices import Devices
from scale import cuda, decode, pack
import train
from test_gpu_paths import step
from test_pack import PAD, examples, models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def lay_out(pairs, views, layout):
    return (pack.lay_out(pairs, views, PAD, 80) if layout == "packed"
            else data.lay_out(pairs, views, PAD))


def on_gpu(model):
    """The model on the GPU with the CUDA forms of attention, as train.py sets them up."""
    return cuda.use_cuda_attention(model.cuda())


def on_cuda(layout):
    teacher, student = models()
    pairs, views, w = examples(student.n_image_tokens)
    batch = lay_out(pairs, views, layout)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    return on_gpu(teacher), on_gpu(student), batch, w.cuda()


def test_smoke_pipeline_on_cuda_with_bf16_autocast(tmp_path):
    models_, world, tok = train.run(train.get_config(["--preset=smoke", "--device=cuda",
                                                      f"--out_dir={tmp_path}", "--eval=false"]))
    student = models_["distilled-selective-full"]
    assert next(student.parameters()).device.type == "cuda"
    # master weights stay fp32 under autocast; the frozen teacher is held in bf16
    assert next(student.parameters()).dtype == torch.float32
    assert next(models_["teacher"].parameters()).dtype == torch.bfloat16
    import eval as evaluation
    rows = evaluation.evaluate_models(models_, world, tok, 32)
    assert all(0 <= v <= 1 for r in rows.values() for k, v in r.items() if k != "transfer")


def test_runtime_uses_pinned_memory_and_bf16():
    rt = Devices("cuda")
    assert rt.cuda and rt.device.type == "cuda"
    batch = rt.to_device({"x": torch.ones(3), "s": ["a"]})
    assert batch["x"].device.type == "cuda" and batch["s"] == ["a"]
    with rt.autocast():
        y = torch.nn.Linear(4, 4).cuda()(torch.ones(2, 4, device="cuda"))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("scope", ["full", "image", "none"])
def test_distill_step_on_cuda_fp32_equals_the_cpu(scope, layout):
    """The same step on both devices: logits, loss and gradients, with packed rows on
    FlexAttention and masked attention on K/V repeated to the query heads on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = False        # Devices turns TF32 on for training speed
    teacher, student = models()
    pairs, views, w = examples(student.n_image_tokens)
    batch = lay_out(pairs, views, layout)
    gpu_batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    gpu = step(on_gpu(copy.deepcopy(student)), on_gpu(copy.deepcopy(teacher)), gpu_batch, w.cuda(),
               scope)
    cpu = step(student, teacher, batch, w, scope)
    assert len(cpu) == len(gpu) > 3
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("scope", ["full", "image", "none"])
def test_every_training_attention_call_runs_on_a_fused_kernel(scope, layout):
    teacher, student, batch, w = on_cuda(layout)
    kvshare.freeze(teacher, torch.bfloat16)
    with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):   # no math fallback
        out = step(student, teacher, batch, w, scope)
    assert all(torch.isfinite(x).all() for x in out)


def test_cached_generation_runs_on_a_fused_kernel():
    teacher, _, batch, _ = on_cuda("padded")
    with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):
        new = teacher.generate(batch["input_ids"][:, :6], batch["attention_mask"][:, :6],
                               max_new_tokens=4)
    assert new.shape == (batch["input_ids"].shape[0], 4)


def test_static_cache_generation_on_a_fused_kernel_in_bf16_and_equal_in_fp32():
    """scale.decode on CUDA: bf16 with SDPA's math kernel disabled (the cache in bf16); fp32 the
    CPU reference's tokens (tests/test_decode.py proves the CPU forms equal)."""
    teacher, _ = models()
    ids, mask = torch.randint(1, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    reference = teacher.generate(ids, mask, max_new_tokens=6)            # CPU, fp32, reference
    gpu = decode.use_static_cache(on_gpu(teacher))
    assert torch.equal(gpu.generate(ids.cuda(), mask.cuda(), max_new_tokens=6).cpu(), reference)
    with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):
        _, kv = gpu(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=True)
        cache = decode.StaticCache(kv, mask.cuda(), max_new_tokens=3)
        logits = [cache.step(gpu, ids[:, i].cuda()) for i in range(3)]
    assert cache.k[0].dtype == torch.bfloat16 and all(torch.isfinite(x).all() for x in logits)


def test_no_host_sync_between_the_student_prefill_and_the_teacher_continuation():
    teacher, student, batch, _ = on_cuda("padded")
    ids = torch.tensor(student.student_only_ids, device="cuda")    # train.py holds it so
    _, kv = kvshare.student_prefill(student, batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kvshare.teacher_continue(teacher, kv, batch, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("packed", [False, True])
def test_a_whole_distill_micro_batch_has_no_host_sync(tmp_path, packed):
    """As train.py runs it (stage_batches on the host, distill_setup, bf16 autocast): forward,
    loss and backward of one micro-batch with CUDA's sync debug mode set to raise. A first call
    warms up (FlexAttention's compile, cuDNN's plans) outside the mode."""
    cfg = train.get_config(["--preset=smoke", "--device=cuda", f"--out_dir={tmp_path}",
                            f"--pack={packed}"])
    world, tok = train.build_data_and_tokenizer(cfg)
    devices = Devices("cuda")
    setup = train.TrainingSetup(cfg, devices, world, tok)
    teacher = train.Decoder(train.lm_config(cfg, tok)).cuda()
    student = train.initial_student(cfg, teacher, tok).cuda()
    model, step_fn, args = train.distill_setup(setup, teacher, student)
    micro_batches = next(train.stage_batches(setup, "distill", student, 0, args))
    counts = train.token_counts(micro_batches)
    batch = devices.to_device(micro_batches[0])
    with devices.autocast():
        step_fn(model, batch, counts, args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with devices.autocast():
            step_fn(model, batch, counts, args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend,masked", [(SDPBackend.FLASH_ATTENTION, False),
                                            (SDPBackend.EFFICIENT_ATTENTION, True),
                                            (SDPBackend.CUDNN_ATTENTION, True),
                                            (SDPBackend.CUDNN_ATTENTION, False)])
def test_bf16_attention_per_kernel_against_the_fp32_reference(backend, masked):
    """cuda_attention in bf16 on one fused kernel vs model.reference_attention in fp32 (math
    kernel), grouped-query heads, left pads: max abs error < 3e-2 on unit-variance inputs (bf16
    keeps 8 bits of mantissa: ~4e-3 relative per value; the softmax-weighted sum of 128 values
    stays well inside), forward; the gradient of q within 3e-2 of its largest entry (or 1)."""
    from model import build_attention_mask, reference_attention
    torch.manual_seed(0)
    B, H, KV, T, hd = 2, 8, 2, 128, 64
    q, k, v = (torch.randn(B, h, T, hd, device="cuda") for h in (H, KV, KV))
    real = torch.ones(B, T, dtype=torch.long, device="cuda")
    real[1, :17] = 0                                                     # left pads in row 1
    mask = build_attention_mask(real, T, 0) if masked else None
    q32 = q.clone().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = reference_attention(q32, k, v, mask)
    ref.sum().backward()
    q16 = q.bfloat16().requires_grad_(True)
    try:
        with sdpa_kernel([backend]):
            out = cuda.cuda_attention(q16, k.bfloat16(), v.bfloat16(), mask)
            out.float().sum().backward()
    except RuntimeError as e:
        if "No available kernel" in str(e):
            pytest.skip(f"{backend} does not run here: {str(e)[:120]}")
        raise
    assert (out.float() - ref).abs().max() < 3e-2
    assert (q16.grad.float() - q32.grad).abs().max() < 3e-2 * max(1.0, q32.grad.abs().max())
