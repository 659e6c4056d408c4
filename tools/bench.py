"""
Benchmarks (not tests): ratios measured side by side in one run, printed as a table.

  python tools/bench.py                      # all benchmarks at tiny / SmolLM2-135M-like sizes
                                             # on this machine
  python tools/bench.py --only=handoff       # one of: handoff, kd_memory, step, hf_step, train,
                                             # paper, loader, pack, decode
  python tools/bench.py --device=cuda        # on a GPU: adds MFU for the training-stage tokens/s
  python tools/bench.py --only=paper --device=cuda --B=8 --P=448 --R=64 --steps=10  # paper's size
  python tools/bench.py --only=paper --size=tiny --device=cpu --steps=3             # CPU-sized
  python tools/bench.py --only=paper --device=cuda --compile    # the same step, torch.compile'd
  python tools/bench.py --only=loader --loader_workers=0,2,4,8   # data loader images/s at 512 px
  python tools/bench.py --only=pack --device=cpu --B=16 --max_len=1024 --steps=3  # packed batches

- handoff:  teacher continuation over the shared context KV vs the teacher recomputing the
            whole sequence (both masked: the same attention kernel), against the ideal R/(P+R).
- kd_memory: chunked vs naive KD at vocab 49,152: peak memory and equal loss; and the whole
  loss (CE + KD), the reference distill.distill_loss vs scale/fused_loss.py: time, peak memory.
- decode:   greedy generation, Decoder.generate vs scale/decode.py's preallocated cache: tokens/s
            and agreement (SmolLM2-360M, B = 8, 256-token prompts, 64 new tokens on CUDA).
- step:     one full distill step (student prefill + teacher continuation + loss + backward).
- hf_step:  the same step built from Hugging Face transformers modules (if installed).
- train:    tokens/s of the three `python train.py` stages (smoke-sized steps of the tiny preset).
- paper:    one full distill step at the paper's size with random weights (no download):
            SmolLM2-360M teacher, student = SigLIP2-B/16-512 + pixel shuffle 4 (64 image tokens)
            + a copy of the teacher's decoder; ms/step, tokens/s, MFU, peak memory, and the
            teacher continuation vs a full teacher forward. Runs with `python bench.py` on CUDA
            only; --only=paper runs it anywhere (--size=tiny on a CPU).
- pack:     padded vs packed batches (--pack=true) of the same examples drawn from a Cauldron-like
            length distribution (pack_lengths; the draw is written to a JSONL file in a temp
            dir): real tokens / computed tokens, and real tokens/s of a full distill step.
            Only with --only=pack (--size=tiny on CPU by default, --size=paper on CUDA).
- loader:   images/s of stream.make_loader at 512 px (JPEG and PNG files, 0/2/4/8 workers;
            only with --only=loader, --loader_workers=0,2 to choose).
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
from plumbing import flops
from scale import cuda as cuda_forms, decode, pack, stream
from scale.fused_loss import fused_distill_loss
import distill
import kvshare
import train
from scale.weights import save_hf_lm
from model import (SIGLIP2_B16_512, Decoder, LMConfig, VisionConfig,
                   vlm_from_teacher)

# The real decoders' shapes (the paper's SmolLM2-360M-Instruct; SmolLM2-135M ships on PyPI), for
# benchmarks (and tests) that need the shapes without the weights. Loaders read config.json.
SMOLLM2_135M = LMConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                        ffn_dim=1536, rope_theta=100000.0, max_positions=8192)
SMOLLM2_360M = LMConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                        ffn_dim=2560, rope_theta=100000.0, max_positions=8192)

def timeit(fn, device, repeat=5, warmup=2):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _proc_status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn, device):
    """Peak memory fn() adds, in bytes: the CUDA allocator's peak on a GPU; on CPU (Linux) the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident
    set before the call. Large tensors are mmapped and returned on free, so this tracks them."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                         # reset the peak RSS to the current RSS
    base = _proc_status_kib("VmRSS")
    fn()
    return max(0, _proc_status_kib("VmHWM") - base) * 1024


def make_batch(B, P, R, vocab, image_token_id, n_image_tokens, image_size, device,
               with_images=True):
    ids = torch.randint(1, image_token_id, (B, P + R), device=device)
    if with_images:
        ids[:, :n_image_tokens] = image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "context_len": P,
            "images": torch.randn(B, 3, image_size, image_size, device=device) if with_images
            else None,
            "labels": ids[:, P:],
            "response_mask": torch.ones(B, R, dtype=torch.bool, device=device),
            "source": ["bench"] * B}


def bench_handoff(device, lm, B=8, P=448, R=64):
    """Teacher continuation (R tokens over shared KV) vs full teacher forward (P+R tokens)."""
    teacher = kvshare.freeze(Decoder(lm).to(device))
    batch = make_batch(B, P, R, lm.vocab_size, lm.vocab_size - 1, 0, 0, device, with_images=False)
    with torch.no_grad():
        _, kv = teacher(batch["input_ids"], use_cache=True)
        t_cont = timeit(lambda: kvshare.teacher_continue(teacher, kv, batch, lm.vocab_size - 1), device)
        # like for like: the full forward with a mask too, so both run on the same kernel
        t_full = timeit(lambda: teacher(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        logits_start=P - 1), device)
    return [("handoff", f"teacher continuation, B={B} P={P} R={R}, {lm.n_layers}x{lm.dim}",
             f"{t_cont * 1e3:.1f} ms", f"full recompute {t_full * 1e3:.1f} ms",
             f"ratio {t_cont / t_full:.3f} (ideal R/(P+R) = {R / (P + R):.3f})")]


def ratio(a, b):
    """a / b to 2 decimals; "n/a" when b is 0 (on a CPU, a peak inside memory already resident)."""
    return f"{a / b:.2f}" if b else "n/a"


def bench_kd_memory(device, V=49152, N=2048, chunk=256):
    """Chunked vs naive KD at a real vocabulary: same loss, bounded float32 temporaries."""
    s = torch.randn(1, N, V, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(1, N, V, device=device, dtype=torch.bfloat16)
    w = torch.ones(1, N, device=device)
    results = {}
    for name, c in (("naive", None), ("chunked", chunk)):
        def step():
            loss = distill.kd_token_sum(s, t, w, chunk_size=c) / N
            loss.backward()
            s.grad = None
            return loss
        results[name] = (float(distill.kd_token_sum(s, t, w, chunk_size=c).detach()) / N,
                         peak_memory(step, device))
    (l_n, m_n), (l_c, m_c) = results["naive"], results["chunked"]
    return [("kd_memory", f"KD fwd+bwd, {N} tokens x vocab {V} (bf16 logits)",
             f"chunked({chunk}) {m_c / 2**20:.0f} MiB",
             f"naive {m_n / 2**20:.0f} MiB",
             f"memory ratio {ratio(m_c, m_n)}; loss {l_c:.5f} vs {l_n:.5f}")] + \
        bench_fused_loss(device, V, N, chunk)


def bench_fused_loss(device, V, N, chunk, n_student_only=3):
    """CE + KD (every token, bf16 logits, 3 student-only ids): the reference distill_loss vs the
    fused one (one student normaliser), both chunked: median time of forward + backward, peak
    memory, the loss of each."""
    g = torch.Generator(device).manual_seed(0)
    s = torch.randn(1, N, V + n_student_only, device=device, generator=g).bfloat16()
    t = torch.randn(1, N, V, device=device, generator=g).bfloat16()
    s.requires_grad_(True)
    labels = torch.randint(0, V, (1, N), device=device, generator=g)
    real, w = torch.ones(1, N, dtype=torch.bool, device=device), torch.ones(1, N, device=device)
    results = {}
    for name, loss_fn in (("reference", distill.distill_loss), ("fused", fused_distill_loss)):
        def step():
            out = loss_fn(s, labels, real, t, w, chunk_size=chunk)
            out["loss"].backward()
            s.grad = None
            return out["loss"].detach()
        results[name] = (timeit(step, device, repeat=3, warmup=1), peak_memory(step, device),
                         float(step()))
    (t_r, m_r, l_r), (t_f, m_f, l_f) = results["reference"], results["fused"]
    return [("kd_memory", f"CE + KD fwd+bwd, {N} tokens x vocab {V}+{n_student_only} (bf16)",
             f"fused {t_f * 1e3:.1f} ms, {m_f / 2**20:.0f} MiB",
             f"reference {t_r * 1e3:.1f} ms, {m_r / 2**20:.0f} MiB",
             f"time ratio {t_f / t_r:.2f}, memory ratio {ratio(m_f, m_r)}; loss {l_f:.5f} vs "
             f"{l_r:.5f}")]


def bench_decode(device, lm, B, P, new_tokens):
    """Greedy generation of new_tokens after left-padded prompts of up to P tokens: the reference
    Decoder.generate vs scale/decode.py's preallocated cache (bf16 autocast and the CUDA attention
    forms on a GPU; fp32 on CPU): tokens/s of each, and how many of the tokens agree."""
    torch.manual_seed(0)
    model = Decoder(lm).to(device).eval()
    ids = torch.randint(1, lm.vocab_size, (B, P), device=device)
    mask = torch.ones_like(ids)
    mask[::2, :P // 4] = 0                                    # every other prompt left-padded
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    if device.type == "cuda":
        cuda_forms.use_cuda_attention(model)
    out = {}
    for name in ("reference", "static"):
        if name == "static":
            decode.use_static_cache(model)
        with autocast:
            t = timeit(lambda: model.generate(ids, mask, max_new_tokens=new_tokens), device,
                       repeat=3, warmup=1)
            out[name] = (t, model.generate(ids, mask, max_new_tokens=new_tokens))
    (t_r, tok_r), (t_s, tok_s) = out["reference"], out["static"]
    agree = float((tok_r == tok_s).float().mean())
    return [("decode", f"greedy, B={B} P<={P} +{new_tokens}, {lm.n_layers}x{lm.dim}",
             f"static cache {B * new_tokens / t_s:.0f} tok/s",
             f"Decoder.generate {B * new_tokens / t_r:.0f} tok/s",
             f"speed-up {t_r / t_s:.2f}x; {100 * agree:.0f} % of tokens agree")]


def distill_step_ours(student, teacher, batch):
    s_logits, kv = kvshare.student_prefill(student, batch)
    t_logits = kvshare.teacher_continue(teacher, kv, batch, batch["image_token_id"])
    w = distill.source_weights("uniform", batch["source"])[:, None].expand_as(batch["labels"])
    out = distill.distill_loss(s_logits, batch["labels"], batch["response_mask"], t_logits, w)
    out["loss"].backward()
    return float(out["loss"].detach())


class TextStudent(torch.nn.Module):
    """A text-only 'VLM' (the decoder alone) so that ours and HF run the same computation."""
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, images=None, **kw):
        return self.decoder(input_ids, **kw)


def bench_step(device, lm, B=4, P=192, R=64, with_hf=True):
    """One distill step: ours vs the same step from transformers modules (DynamicCache handoff)."""
    torch.manual_seed(0)
    student, teacher = TextStudent(Decoder(lm).to(device)), kvshare.freeze(Decoder(lm).to(device))
    batch = make_batch(B, P, R, lm.vocab_size, lm.vocab_size - 1, 0, 0, device, with_images=False)
    batch["image_token_id"] = lm.vocab_size - 1
    t_ours = timeit(lambda: distill_step_ours(student, teacher, batch), device, repeat=3, warmup=1)
    m_ours = peak_memory(lambda: distill_step_ours(student, teacher, batch), device)
    rows = [("step",
             f"distill step (ours), B={B} P={P} R={R}, {lm.n_layers}x{lm.dim}, vocab "
             f"{lm.vocab_size}",
             f"{t_ours * 1e3:.0f} ms", f"peak {m_ours / 2**20:.0f} MiB", "")]
    if not with_hf:
        return rows
    try:
        import transformers
    except ImportError:
        return rows + [("hf_step", "skipped: transformers not installed", "", "", "")]
    with tempfile.TemporaryDirectory() as d:
        save_hf_lm(student.decoder, d + "/s")
        save_hf_lm(teacher, d + "/t")
        load = transformers.LlamaForCausalLM.from_pretrained
        hf_s = load(d + "/s", attn_implementation="sdpa").to(device)
        hf_t = load(d + "/t", attn_implementation="sdpa").to(device).eval()
    hf_t.requires_grad_(False)

    def hf_step():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = hf_s(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=R + 1)
        s_logits = out.logits[:, :R]
        cache = out.past_key_values
        cache.crop(-(R + 1))                              # keep the shared context KV (P-1 columns)
        with torch.no_grad():
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
            pos = torch.arange(P - 1, P + R - 1, device=device)[None].expand(B, -1)
            t_logits = hf_t(input_ids=ids[:, P - 1:P + R - 1], attention_mask=mask[:, :P + R - 1],
                            past_key_values=cache, position_ids=pos).logits
        loss = distill.distill_loss(s_logits, batch["labels"], batch["response_mask"], t_logits,
                                    distill.source_weights("uniform", batch["source"]))["loss"]
        loss.backward()
        return float(loss.detach())

    l_ours, l_hf = distill_step_ours(student, teacher, batch), hf_step()
    t_hf = timeit(hf_step, device, repeat=3, warmup=1)
    m_hf = peak_memory(hf_step, device)
    return rows + [("hf_step", "same step from transformers LlamaForCausalLM + DynamicCache",
                    f"{t_hf * 1e3:.0f} ms", f"peak {m_hf / 2**20:.0f} MiB",
                    f"ours/HF time {t_ours / t_hf:.2f}, memory {m_ours / max(m_hf, 1):.2f}; "
                    f"loss {l_ours:.5f} vs {l_hf:.5f}")]


def bench_train(device, steps=20, peak_tflops=None):
    """Tokens/s of each `python train.py` stage (tiny preset, `steps` steps each); MFU on CUDA as
    its log.jsonl gives it (plumbing/flops.py, attention included; the GPU's peak from its name:
    peak_tflops is unused here, kept for the call's shape)."""
    with tempfile.TemporaryDirectory() as d:
        argv = [f"--out_dir={d}", f"--device={device.type}", "--eval=false",
                "--ckpt_every=1000000"] + \
               [f"--{s}_steps={steps}" for s in ("pretrain", "align", "adapt", "distill")]
        models, _, _ = train.run(train.get_config(argv))
        log = [json.loads(line) for line in open(f"{d}/log.jsonl")]
    rows = []
    for stage in ("pretrain", "align", "adapt", "distill-selective-full"):
        recs = [r for r in log if r["stage"] == stage][3:]              # skip warm-up steps
        tok_s = sum(r["tokens"] for r in recs[1:]) / (recs[-1]["time"] - recs[0]["time"])
        mfus = [r["mfu"] for r in recs if "mfu" in r]           # the log's, plumbing/flops.py
        mfu = f"MFU {100 * statistics.median(mfus):.3f}% (median)" if mfus else ""
        rows.append(("train", f"stage {stage} (tiny preset, {len(recs)} timed steps)",
                     f"{tok_s:,.0f} tokens/s", "log.jsonl tokens_per_s / mfu", mfu))
    return rows


# ----------------------------------------------------------------------------------------
# The paper's size

PAPER_SIZES = {   # (decoder config, vision config, pixel-shuffle factor)
    "paper": (SMOLLM2_360M, SIGLIP2_B16_512, 4),                   # 1024 patches -> 64 image tokens
    "tiny": (LMConfig(vocab_size=512), VisionConfig(), 4),          # 64 patches -> 4 image tokens
}


def flops_per_step(student, teacher, B, P, R):
    """Model FLOPs (student, teacher) of one padded distill step: plumbing.flops, the formula of
    train.py's MFU (weights 6N / 2N per token, attention's two matmuls included)."""
    return flops.distill_step_flops(student, teacher, B, P, R)


def _peak_bytes(fn, device):
    """Absolute peak memory during fn(): CUDA allocator peak (tensors), or peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                     # reset the peak RSS to the current RSS
    except OSError:
        pass                                                 # then: the process's peak so far
    fn()
    return _proc_status_kib("VmHWM") * 1024


def bench_paper(device, size="paper", B=8, P=448, R=64, steps=5, warmup=2, amp=None,
                teacher_dtype=None, grad_ckpt=False, kd_chunk=None, peak_tflops=None, seed=0,
                compile=False):
    """One full distill step at the paper's size (random init, no weights needed): student
    prefill + teacher continuation (scope full) + distill.distill_loss (uniform KD) + backward
    + AdamW (fused on CUDA), as train.py's distill stage does it.

    amp: "bf16" (autocast; default on CUDA) or "fp32" (default on CPU). teacher_dtype: the dtype
    kvshare.freeze holds the teacher in (default bf16 under bf16 autocast, else fp32).
    compile: torch.compile the student and the frozen teacher, as train.py --compile does (the
    compile time falls in the `warmup` steps; the teacher timings below use the compiled teacher).
    Returns a dict of numbers (times are medians over `steps` after `warmup`):
      ms_per_step, tokens_per_s (B*(P+R) student tokens per step), tflop_per_step (flops_per_step),
      achieved_tflops, mfu (achieved / peak_tflops; NaN without a peak), peak_mem_mib,
      teacher_cont_ms / teacher_full_ms (no-grad teacher continuation over R tokens vs a full
      teacher forward over P+R tokens, same dtype), cont_ratio and ideal_ratio = R/(P+R),
      kv_mib (the shared KV's size), loss, n_student / n_teacher (parameters)."""
    lm, vis, factor = PAPER_SIZES[size]
    amp = amp or ("bf16" if device.type == "cuda" else "fp32")
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[amp]
    teacher_dtype = teacher_dtype or compute
    autocast = (lambda: torch.autocast(device.type,
                                       dtype=compute)) if amp != "fp32" else contextlib.nullcontext
    torch.manual_seed(seed)
    teacher = Decoder(lm).to(device)
    image_token_id = lm.vocab_size                      # a new id: the student's vocab grows by one
    student = vlm_from_teacher(teacher, vis, image_token_id, shuffle_factor=factor).train()
    student.decoder.gradient_checkpointing = grad_ckpt
    teacher = kvshare.freeze(teacher, teacher_dtype)
    kvshare.check_compatible(teacher.cfg, student.decoder.cfg)
    if P <= student.n_image_tokens:
        raise ValueError(f"P={P} must exceed the {student.n_image_tokens} image tokens (the "
                         "context ends in text)")
    batch = make_batch(B, P, R, lm.vocab_size, image_token_id, student.n_image_tokens,
                       vis.image_size, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    losses = []
    if compile:
        torch.compiler.reset()
    # the modules to call: plain, or their torch.compile wrappers (same parameters)
    student_fwd = torch.compile(student) if compile else student
    teacher_fwd = torch.compile(teacher) if compile else teacher

    # as train.py: everything the step reads is on the device before it (no host copy, no sync)
    only_ids = torch.tensor([image_token_id], device=device)
    w = distill.source_weights("uniform", batch["source"])[:, None].expand_as(
        batch["labels"]).to(device)
    index = data.flat_index(batch["response_mask"].cpu()).to(device)   # every token gets KD

    def step():
        with autocast():
            s_logits, kv = kvshare.student_prefill(student_fwd, batch)
            t_logits = kvshare.teacher_continue(teacher_fwd, kv, batch, only_ids)
            out = distill.distill_loss(s_logits, batch["labels"], batch["response_mask"], t_logits,
                                       w, chunk_size=kd_chunk, ce_index=index, kd_index=index)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out["loss"].detach())                  # fetched once, after the timing

    t_step = timeit(step, device, repeat=steps, warmup=warmup)
    peak = _peak_bytes(step, device)
    with torch.no_grad(), autocast():
        _, kv = kvshare.student_prefill(student_fwd, batch)
        text_ids = batch["input_ids"].masked_fill(batch["input_ids"] == image_token_id, 0)
        t_cont = timeit(lambda: kvshare.teacher_continue(teacher_fwd, kv, batch, only_ids), device,
                        repeat=steps, warmup=warmup)
        t_full = timeit(lambda: teacher_fwd(text_ids, attention_mask=batch["attention_mask"],
                                            logits_start=P), device, repeat=steps, warmup=warmup)
    f_student, f_teacher = flops_per_step(student, teacher, B, P, R)
    achieved = (f_student + f_teacher) / t_step / 1e12
    return {"ms_per_step": t_step * 1e3, "tokens_per_s": B * (P + R) / t_step,
            "tflop_per_step": (f_student + f_teacher) / 1e12, "achieved_tflops": achieved,
            "mfu": achieved / peak_tflops if peak_tflops else float("nan"),
            "peak_mem_mib": peak / 2**20,
            "teacher_cont_ms": t_cont * 1e3, "teacher_full_ms": t_full * 1e3,
            "cont_ratio": t_cont / t_full,
            "ideal_ratio": R / (P + R), "kv_mib": sum(k.nbytes + v.nbytes for k, v in kv) / 2**20,
            "loss": float(losses[-1]), "n_student": sum(p.numel() for p in student.parameters()),
            "n_teacher": sum(p.numel() for p in teacher.parameters()),
            "kv_dtype": str(kv[0][0].dtype).replace("torch.", ""), "amp": amp,
            "teacher_dtype": str(teacher_dtype).replace("torch.", ""), "compiled": compile}


def pack_lengths(n, n_image_tokens, seed=0, text_only=0.2):
    """n examples' lengths from a Cauldron-like distribution: (prompt text tokens, response
    tokens, image views). Prompt and response lengths log-normal (medians 48 and 24 tokens,
    sigma 1.0 and 1.2, clipped to 4..512 and 1..512); 80 % of the examples have an image split
    nanoVLM-style into a (n_h, n_w) grid, n_h and n_w uniform in 1..4: 1 view for a 1x1 grid,
    else the global view + n_h * n_w tiles (up to 17 views), each view n_image_tokens <image>
    ids plus one view token (data.view_tokens)."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(np.log(48), 1.0, n), 4, 512).astype(int)
    response = np.clip(rng.lognormal(np.log(24), 1.2, n), 1, 512).astype(int)
    grid = rng.integers(1, 5, size=(n, 2))
    views = np.where(grid.prod(1) == 1, 1, 1 + grid.prod(1)) * (rng.random(n) >= text_only)
    return [{"prompt": int(p), "response": int(r), "views": int(v),
             "image_tokens": int(v) * (n_image_tokens + 1)}
            for p, r, v in zip(prompt, response, views)]


def bench_pack(device, size="tiny", B=16, max_len=1024, steps=3, n_batches=4, seed=0, amp=None):
    """Padded vs packed layouts of the same B examples per step (pack_lengths, written to a
    JSONL file in a temp dir and read back): computed tokens (the student's columns, rows x L),
    the real-token fraction, and real tokens/s of a full distill step (student prefill, teacher
    continuation scope full, uniform KD, backward, AdamW) over n_batches batches (each timed
    as the fastest of `steps` runs, padded and packed alternating). Random tokens and pixels;
    examples longer than max_len have their response cut (collate's rule)."""
    lm, vis, factor = PAPER_SIZES[size]
    amp = amp or ("bf16" if device.type == "cuda" else "fp32")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" \
        else contextlib.nullcontext
    torch.manual_seed(seed)
    teacher = Decoder(lm).to(device)
    image_id, view_id = lm.vocab_size, lm.vocab_size + 1    # student-only ids past the teacher's
    student = vlm_from_teacher(teacher, vis, image_id, shuffle_factor=factor,
                               view_token_ids=(view_id,)).train()
    teacher = kvshare.freeze(teacher, torch.bfloat16 if amp == "bf16" else None)
    n_img = student.n_image_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lengths.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in pack_lengths(B * n_batches, n_img, seed))
        with open(path) as f:
            drawn = [json.loads(line) for line in f]
    gen = torch.Generator().manual_seed(seed)
    batches = {"padded": [], "packed": []}
    for k in range(n_batches):
        pairs, views = [], []
        for x in drawn[k * B:(k + 1) * B]:
            ctx = ([view_id] + [image_id] * n_img) * x["views"] \
                + torch.randint(1, lm.vocab_size, (x["prompt"],), generator=gen).tolist()
            resp = torch.randint(1, lm.vocab_size, (x["response"],), generator=gen).tolist()
            if len(ctx) >= max_len:
                raise ValueError(f"--max_len={max_len} leaves no room for a response after a "
                                 f"{len(ctx)}-token context; raise it")
            pairs.append((ctx, resp[:max_len - len(ctx)]))
            views.append([torch.randn(x["views"], 3, vis.image_size, vis.image_size,
                                      generator=gen)] if x["views"] else [])
        for name, pack_len in (("padded", None), ("packed", max_len)):
            b = pack.lay_out(pairs, views, 0, pack_len) if pack_len else data.lay_out(pairs, views, 0)
            b = {key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()}
            batches[name].append(b)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step(b):
        with autocast():
            s, t = pack.handoff(student, teacher, b, student.student_only_ids)
            loss = distill.distill_loss(s, b["labels"], b["response_mask"], t,
                                        kd_weight=torch.ones(s.shape[:2], device=device))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name in batches:
        step(batches[name][0])                                                 # warmup
    # padded and packed alternate, batch by batch, so that a busy machine slows both alike; each
    # batch's time is the fastest of `steps` runs
    seconds = {name: 0.0 for name in batches}
    for k in range(n_batches):
        best = {name: float("inf") for name in batches}
        for _ in range(steps):
            for name in batches:
                best[name] = min(best[name], timeit(lambda: step(batches[name][k]), device,
                                                    repeat=1, warmup=0))
        for name in batches:
            seconds[name] += best[name]
    out = {}
    for name, bs in batches.items():
        real = sum(int(b["attention_mask"].sum()) for b in bs)
        computed = sum(b["input_ids"].numel() for b in bs)
        out[name] = {"real": real, "computed": computed, "fraction": real / computed,
                     "tokens_per_s": real / seconds[name],
                     "rows": sum(b["input_ids"].shape[0] for b in bs)}
    out["speedup"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    out["grouped_fraction"] = grouped_fraction(pack_lengths(B * 64, n_img, seed), B, max_len)
    return out


def grouped_fraction(lengths, B, max_len):
    """The simpler alternative to packing: padded batches of B examples of similar total length
    (a pool of len(lengths) examples sorted by length, responses cut to max_len). Its real-token
    fraction in the padded layout (contexts padded to the longest context, responses to the
    longest response)."""
    P = np.array([x["prompt"] + x["image_tokens"] for x in lengths])
    R = np.minimum([x["response"] for x in lengths], np.maximum(max_len - P, 1))
    order = np.argsort(P + R, kind="stable")
    groups = [order[k:k + B] for k in range(0, len(order), B)]
    return sum(int((P[g] + R[g]).sum()) for g in groups) / sum(
        len(g) * int(P[g].max() + R[g].max()) for g in groups)


def pack_rows_table(r, size, B, max_len):
    setting = f"{size}, {B} examples/step, max_len {max_len}"
    return [["pack: real / computed tokens", setting,
             f"packed {r['packed']['fraction']:.1%} ({r['packed']['rows']} rows)",
             f"padded {r['padded']['fraction']:.1%} ({r['padded']['rows']} rows)",
             f"target packed >= 95 %; length-grouped padded {r['grouped_fraction']:.1%}"],
            ["pack: real tokens/s, distill step", setting,
             f"packed {r['packed']['tokens_per_s']:,.0f}",
             f"padded {r['padded']['tokens_per_s']:,.0f}",
             f"{r['speedup']:.2f}x (target >= 1.5x on CPU)"]]


def paper_rows(r, size, B, P, R, peak_tflops):
    setting = (f"{size}: student {r['n_student'] / 1e6:.0f}M, teacher {r['n_teacher'] / 1e6:.0f}M, "
               f"B={B} P={P} R={R}, amp {r['amp']}, teacher {r['teacher_dtype']}"
               + (", torch.compile" if r.get("compiled") else ", eager"))
    mfu = (f"MFU {100 * r['mfu']:.1f}% of {peak_tflops:g} TFLOP/s" if peak_tflops
           else "MFU n/a (no --peak_tflops)")
    return [("paper", "distill step " + setting, f"{r['ms_per_step']:.1f} ms/step",
             f"{r['tokens_per_s']:,.0f} tokens/s, {r['achieved_tflops']:.3g} TFLOP/s",
             f"{mfu}; peak {r['peak_mem_mib']:,.0f} MiB; loss {r['loss']:.3f}"),
            ("paper",
             f"teacher continuation (R tokens over shared {r['kv_dtype']} KV, {r['kv_mib']:.1f} "
             "MiB)",
             f"{r['teacher_cont_ms']:.1f} ms",
             f"full teacher forward {r['teacher_full_ms']:.1f} ms",
             f"ratio {r['cont_ratio']:.3f} (ideal R/(P+R) = {r['ideal_ratio']:.3f})")]


def bench_loader(workers=(0, 2, 4, 8), image_size=512, n_images=64, batch_size=8, batches=8):
    """Images/s of stream.make_loader at image_size px: synthetic JPEG and PNG files (noise,
    1.5 x image_size, so every image is decoded and resized) in a temp folder, JSONL-indexed.
    Timed from the loader's creation (worker start-up included) over `batches` batches."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tok = data.train_tokenizer(["what is in the picture ? a picture ."] * 4, vocab_size=300)
        rng, side = np.random.default_rng(0), image_size * 3 // 2
        for fmt in ("jpeg", "png"):
            lines = []
            for i in range(n_images):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f"{i}.{fmt}"))
                lines.append(json.dumps({"image": f"{i}.{fmt}",
                                         "prompt": "what is in the picture ?",
                                         "response": " a picture ."}))
            path = os.path.join(d, f"{fmt}.jsonl")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            ds = stream.StreamDataset(path, tok, n_image_tokens=64, image_size=image_size)
            for w in workers:
                t = time.perf_counter()                  # from the start: prefetch can't flatter it
                it = iter(stream.make_loader(ds, batch_size, seed=0, num_workers=w, timeout=300))
                for _ in range(batches):
                    next(it)
                rate = batches * batch_size / (time.perf_counter() - t)
                rows.append(("loader", f"{fmt} {side}px -> {image_size}px, batch {batch_size}, "
                             f"{w} workers", f"{rate:.1f} images/s", f"{os.cpu_count()} CPUs", ""))
                del it
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only",
                    choices=["handoff", "kd_memory", "step", "hf_step", "train", "paper", "loader",
                             "pack", "decode"])
    ap.add_argument("--loader_workers", default="0,2,4,8", help="worker counts for --only=loader")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="accelerator peak for MFU (default on CUDA: 989, H100 SXM dense bf16)")
    g = ap.add_argument_group("paper",
                              "--only=paper (MFU = flops_per_step / time / peak; see bench_paper)")
    g.add_argument("--size", default="paper", choices=sorted(PAPER_SIZES))
    g.add_argument("--B", type=int, default=8)
    g.add_argument("--P", type=int, default=448, help="context columns (64 image tokens + prompt)")
    g.add_argument("--R", type=int, default=64, help="response columns")
    g.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--amp", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--teacher_dtype", choices=["bf16", "fp32"], default=None,
                   help="default: as --amp")
    g.add_argument("--grad_ckpt", action="store_true",
                   help="activation checkpointing of the student's blocks")
    g.add_argument("--kd_chunk", type=int, default=None)
    g.add_argument("--kd_tokens", type=int, default=None,
                   help="--only=kd_memory: KD tokens (default 8192 on CUDA, 1024 on CPU)")
    g.add_argument("--max_len", type=int, default=None,
                   help="--only=pack: tokens of one packed row (default 1024 tiny, 4096 paper)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the teacher (as train.py --compile); "
                        "compile time falls in --warmup")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda"
                          or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    peak = args.peak_tflops or (989.0 if cuda else None)
    torch.manual_seed(0)
    smol = SMOLLM2_135M
    tiny = LMConfig(vocab_size=512)
    rows = []
    run = lambda name: args.only in (None, name)
    if run("handoff"):
        rows += bench_handoff(device, smol,
                              **(dict(B=8, P=448, R=64) if cuda else dict(B=2, P=448, R=64)))
        rows += bench_handoff(device, tiny, B=32, P=24, R=8)
    if run("kd_memory"):
        rows += bench_kd_memory(device, N=args.kd_tokens or (8192 if cuda else 1024))
    if run("decode"):
        rows += bench_decode(device, *((SMOLLM2_360M, 8, 256, 64) if cuda else (tiny, 4, 32, 16)))
    if run("step") or run("hf_step"):
        rows += bench_step(device, smol,
                           **(dict(B=8, P=448, R=64) if cuda else dict(B=1, P=192, R=32)),
                           with_hf=args.only != "step")
    if run("paper") and (cuda or args.only == "paper"):
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True                    # as plumbing.devices.Devices
        td = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.teacher_dtype)
        r = bench_paper(device, args.size, args.B, args.P, args.R, args.steps, args.warmup,
                        args.amp, td, args.grad_ckpt, args.kd_chunk, peak, compile=args.compile)
        rows += paper_rows(r, args.size, args.B, args.P, args.R, peak)
    if args.only == "pack":
        size = args.size if "--size" in " ".join(sys.argv) else "paper" if cuda else "tiny"
        max_len = args.max_len or (4096 if size == "paper" else 1024)
        r = bench_pack(device, size, args.B, max_len, args.steps, amp=args.amp)
        rows += pack_rows_table(r, size, args.B, max_len)
    if args.only == "loader":           # not in the default run: it measures the data pipeline
        rows += bench_loader(tuple(int(w) for w in args.loader_workers.split(",")))
    if run("train"):
        rows += bench_train(device, steps=40 if cuda else 20, peak_tflops=peak)
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if cuda else cpu
    print(f"\nbench.py on {name}, torch {torch.__version__}\n")
    print("| bench | setting | ours | reference | ratio / note |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:      # bad input: one line, not a traceback
        sys.exit(f"tools/bench.py: {e}")
