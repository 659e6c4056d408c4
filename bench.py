"""
Benchmarks (not tests): ratios measured side by side in one run, printed as a table.

  python bench.py                      # all benchmarks at tiny / SmolLM2-135M-like sizes on this machine
  python bench.py --only=handoff       # one of: handoff, kd_memory, step, hf_step, train, loader
  python bench.py --device=cuda        # on a GPU: adds MFU for the training-stage tokens/s

- handoff:  teacher continuation over the shared context KV vs the teacher recomputing the
            whole sequence, against the ideal ratio R/(P+R).
- kd_memory: chunked vs naive KD at vocab 49,152: peak memory and equal loss.
- step:     one full distill step (student prefill + teacher continuation + loss + backward).
- hf_step:  the same step built from Hugging Face transformers modules (if installed).
- train:    tokens/s of the three `python train.py` stages (smoke-sized steps of the tiny preset).
- loader:   images/s of data.make_loader at 512 px (JPEG and PNG files, 0/2/4/8 workers;
            only with --only=loader, --loader_workers=0,2 to choose).
"""
import argparse
import statistics
import time

import torch

import distill
import kvshare
from model import LMConfig, Decoder, LM_PRESETS, make_config


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
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                 # reset the peak RSS to the current RSS
    base = _proc_status_kib("VmRSS")
    fn()
    return max(0, _proc_status_kib("VmHWM") - base) * 1024


def make_batch(B, P, R, vocab, image_token_id, n_image_tokens, image_size, device, with_images=True):
    ids = torch.randint(1, image_token_id, (B, P + R), device=device)
    if with_images:
        ids[:, :n_image_tokens] = image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "context_len": P,
            "images": torch.randn(B, 3, image_size, image_size, device=device) if with_images else None,
            "labels": ids[:, P:], "response_mask": torch.ones(B, R, dtype=torch.bool, device=device),
            "source": ["bench"] * B}


def bench_handoff(device, lm, B=8, P=448, R=64):
    """Teacher continuation (R tokens over shared KV) vs full teacher forward (P+R tokens)."""
    teacher = kvshare.freeze(Decoder(lm).to(device))
    batch = make_batch(B, P, R, lm.vocab_size, lm.vocab_size - 1, 0, 0, device, with_images=False)
    with torch.no_grad():
        _, kv = teacher(batch["input_ids"], use_cache=True)
        t_cont = timeit(lambda: kvshare.teacher_continue(teacher, kv, batch, lm.vocab_size - 1, "full"), device)
        t_full = timeit(lambda: teacher(batch["input_ids"], logits_start=P - 1), device)
    return [("handoff", f"teacher continuation, B={B} P={P} R={R}, {lm.n_layers}x{lm.dim}",
             f"{t_cont * 1e3:.1f} ms", f"full recompute {t_full * 1e3:.1f} ms",
             f"ratio {t_cont / t_full:.3f} (ideal R/(P+R) = {R / (P + R):.3f})")]


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
        results[name] = (float(distill.kd_token_sum(s, t, w, chunk_size=c).detach()) / N, peak_memory(step, device))
    (l_n, m_n), (l_c, m_c) = results["naive"], results["chunked"]
    return [("kd_memory", f"KD fwd+bwd, {N} tokens x vocab {V} (bf16 logits)", f"chunked({chunk}) {m_c / 2**20:.0f} MiB",
             f"naive {m_n / 2**20:.0f} MiB", f"memory ratio {m_c / m_n:.2f}; loss {l_c:.5f} vs {l_n:.5f}")]


def distill_step_ours(student, teacher, batch):
    s_logits, t_logits = kvshare.distill_forward(student, teacher, batch, batch["image_token_id"], "full")
    out = distill.distill_loss(s_logits, batch["labels"], batch["response_mask"], t_logits, batch["source"], "uniform")
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
    rows = [("step", f"distill step (ours), B={B} P={P} R={R}, {lm.n_layers}x{lm.dim}, vocab {lm.vocab_size}",
             f"{t_ours * 1e3:.0f} ms", f"peak {m_ours / 2**20:.0f} MiB", "")]
    if not with_hf:
        return rows
    try:
        import transformers
    except ImportError:
        return rows + [("hf_step", "skipped: transformers not installed", "", "", "")]
    import tempfile
    from weights import save_hf_lm
    with tempfile.TemporaryDirectory() as d:
        save_hf_lm(student.decoder, d + "/s")
        save_hf_lm(teacher, d + "/t")
        hf_s = transformers.LlamaForCausalLM.from_pretrained(d + "/s", attn_implementation="sdpa").to(device)
        hf_t = transformers.LlamaForCausalLM.from_pretrained(d + "/t", attn_implementation="sdpa").to(device).eval()
    hf_t.requires_grad_(False)

    def hf_step():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = hf_s(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=R + 1)
        s_logits = out.logits[:, :R]
        cache = out.past_key_values
        cache.crop(-(R + 1))                                # keep the shared context KV (P-1 columns)
        with torch.no_grad():
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
            pos = torch.arange(P - 1, P + R - 1, device=device)[None].expand(B, -1)
            t_logits = hf_t(input_ids=ids[:, P - 1:P + R - 1], attention_mask=mask[:, :P + R - 1],
                            past_key_values=cache, position_ids=pos).logits
        loss = distill.distill_loss(s_logits, batch["labels"], batch["response_mask"], t_logits, batch["source"],
                                    "uniform")["loss"]
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
    """Tokens/s of each `python train.py` stage (tiny preset, `steps` steps each); MFU on CUDA
    from the 6N rule (6 x trainable-path params per token, + 2N for the teacher's forward)."""
    import json
    import tempfile
    import train
    with tempfile.TemporaryDirectory() as d:
        argv = [f"--out_dir={d}", f"--device={device.type}", "--eval=false", "--ckpt_every=1000000"] + \
               [f"--{s}_steps={steps}" for s in ("pretrain", "align", "adapt", "distill")]
        models, _, _ = train.run(train.get_config(argv))
        log = [json.loads(line) for line in open(f"{d}/log.jsonl")]
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    n_teacher, n_student = n["teacher"], n["distilled-selective-full"]
    flops_per_token = {"pretrain": 6 * n_teacher, "align": 6 * n_student, "adapt": 6 * n_student,
                       "distill-selective-full": 6 * n_student + 2 * n_teacher}
    rows = []
    for stage, fpt in flops_per_token.items():
        recs = [r for r in log if r["stage"] == stage][3:]              # skip warm-up steps
        tok_s = sum(r["tokens"] for r in recs[1:]) / (recs[-1]["time"] - recs[0]["time"])
        mfu = f"MFU {100 * fpt * tok_s / (peak_tflops * 1e12):.3f}%" if peak_tflops else ""
        rows.append(("train", f"stage {stage} (tiny preset, {len(recs)} timed steps)", f"{tok_s:,.0f} tokens/s",
                     f"{fpt / 1e6:.1f} MFLOP/token", mfu))
    return rows


def bench_loader(workers=(0, 2, 4, 8), image_size=512, n_images=64, batch_size=8, batches=8):
    """Images/s of data.make_loader at image_size px: synthetic JPEG and PNG files (noise,
    1.5 x image_size, so every image is decoded and resized) in a temp folder, JSONL-indexed.
    Timed from the loader's creation (worker start-up included) over `batches` batches."""
    import json
    import os
    import tempfile

    import numpy as np
    from PIL import Image

    import data
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tok = data.train_tokenizer(["what is in the picture ? a picture ."] * 4, vocab_size=300)
        rng, side = np.random.default_rng(0), image_size * 3 // 2
        for fmt in ("jpeg", "png"):
            lines = []
            for i in range(n_images):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f"{i}.{fmt}"))
                lines.append(json.dumps({"image": f"{i}.{fmt}", "prompt": "what is in the picture ?",
                                         "response": " a picture ."}))
            path = os.path.join(d, f"{fmt}.jsonl")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            ds = data.StreamDataset(path, tok, n_image_tokens=64, image_size=image_size)
            for w in workers:
                t = time.perf_counter()                     # from the start: prefetch can't flatter it
                it = iter(data.make_loader(ds, batch_size, seed=0, num_workers=w, timeout=300))
                for _ in range(batches):
                    next(it)
                rate = batches * batch_size / (time.perf_counter() - t)
                rows.append(("loader", f"{fmt} {side}px -> {image_size}px, batch {batch_size}, "
                             f"{w} workers", f"{rate:.1f} images/s", f"{os.cpu_count()} CPUs", ""))
                del it
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["handoff", "kd_memory", "step", "hf_step", "train", "loader"])
    ap.add_argument("--loader_workers", default="0,2,4,8", help="worker counts for --only=loader")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="accelerator peak for MFU (default on CUDA: 989, H100 SXM dense bf16)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    peak = args.peak_tflops or (989.0 if cuda else None)
    torch.manual_seed(0)
    smol = make_config(LMConfig, LM_PRESETS, "smollm2-135m")
    tiny = make_config(LMConfig, LM_PRESETS, "tiny", vocab_size=512)
    rows = []
    run = lambda name: args.only in (None, name)
    if run("handoff"):
        rows += bench_handoff(device, smol, **(dict(B=8, P=448, R=64) if cuda else dict(B=2, P=448, R=64)))
        rows += bench_handoff(device, tiny, B=32, P=24, R=8)
    if run("kd_memory"):
        rows += bench_kd_memory(device, N=8192 if cuda else 1024)
    if run("step") or run("hf_step"):
        rows += bench_step(device, smol, **(dict(B=8, P=448, R=64) if cuda else dict(B=1, P=192, R=32)),
                           with_hf=args.only != "step")
    if args.only == "loader":           # not in the default run: it measures the data pipeline
        rows += bench_loader(tuple(int(w) for w in args.loader_workers.split(",")))
    if run("train"):
        rows += bench_train(device, steps=40 if cuda else 20, peak_tflops=peak)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nbench.py on {name}, torch {torch.__version__}\n")
    print("| bench | setting | ours | reference | ratio / note |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
