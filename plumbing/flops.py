"""
Model FLOPs, for the MFU of train.py's log (on CUDA) and of tools/bench.py: one formula. Per
token, 2 FLOPs per matmul weight it meets in a forward (6 with the backward), plus attention's
two matmuls (QK^T and AV: 4 * n_heads * head_dim per query-key pair and layer, forward), which
the 6N rule leaves out. Keys are counted whole (T keys per query, not the causal half): the
fused kernels skip masked blocks only in part. Embedding lookups are free; lm_head counts as
vocab * dim whether or not it is tied. Imports no module of this repository.
"""


def body_and_head(decoder):
    """(matmul weights of the blocks and final norm, of the lm_head) of a model.Decoder."""
    head = decoder.lm_head.weight.numel()
    body = sum(p.numel() for n, p in decoder.named_parameters()
               if not n.startswith(("embed.", "lm_head.")))
    return body, head


def decoder_flops(decoder, rows, queries, keys, head_columns, backward):
    """One pass of `decoder` over rows x queries new tokens, each attending to `keys` keys (past +
    new), the lm_head on rows x head_columns of them; x3 with the backward."""
    body, head = body_and_head(decoder)
    c = decoder.cfg
    f = 2 * (body * rows * queries + head * rows * head_columns) \
        + 4 * c.n_layers * c.n_heads * c.head_dim * rows * queries * keys
    return 3 * f if backward else f


def vision_flops(vlm, n_views, backward):
    """The vision tower (patches attending to every patch) and the projector over n_views views."""
    v, n = vlm.vision.cfg, vlm.vision.cfg.n_patches
    n_vis = sum(p.numel() for p in vlm.vision.parameters())
    n_proj = sum(p.numel() for p in vlm.projector.parameters())
    f = 2 * (n_vis * n_views * n + n_proj * n_views * vlm.n_image_tokens) \
        + 4 * v.n_layers * v.dim * n_views * n * n
    return 3 * f if backward else f


def distill_step_flops(student, teacher, B, P, R, n_views=None):
    """(student, teacher) FLOPs of one padded distill step: the student's prefill over P + R
    columns (lm_head on R + 1 of them; one view per example unless n_views) with its backward;
    the teacher's continuation, R tokens over P - 1 + R keys, forward only."""
    f_student = decoder_flops(student.decoder, B, P + R, P + R, R + 1, backward=True) \
        + vision_flops(student, B if n_views is None else n_views, backward=True)
    f_teacher = decoder_flops(teacher, B, R, P - 1 + R, R, backward=False) if teacher else 0
    return f_student, f_teacher


def batch_flops(model, teacher, batch):
    """Model FLOPs of one micro-batch of train.py's stages, from its shapes (host): stage 1 text
    windows, stages 2-3 padded or packed rows (+ the teacher's continuation in stage 3)."""
    if "tokens" in batch:                                                  # stage 1: (B, L + 1)
        B, L = batch["tokens"][:, :-1].shape
        return decoder_flops(model, B, L, L, L, backward=True)
    rows, T = batch["input_ids"].shape
    n_views = 0 if batch["images"] is None else len(batch["images"])
    N = int(batch["labels"].numel())                      # response tokens (padded: B x R)
    f = decoder_flops(model.decoder, rows, T, T, N // rows + 1, backward=True) \
        + vision_flops(model, n_views, backward=True)
    if teacher is not None:
        new = batch["teacher_ids"].shape[1] if "teacher_ids" in batch else N // rows
        f += decoder_flops(teacher, rows, new, T, N // rows, backward=False)
    return f


# Dense bf16 peak TFLOP/s by device name (data sheets, no sparsity); MFU only where known.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0}


def peak_tflops(device_name):
    """The dense bf16 peak of a GPU named device_name (torch.cuda.get_device_name), else None."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
