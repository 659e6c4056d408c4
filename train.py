"""
LinguDistill in three stages, top to bottom: the config, the batches, the steps (one per stage),
the one training loop, the three stages, setup, main. The method is kvshare.py + distill.py;
what runs around it (flags, DDP, checkpoints, real data, packed rows) is in plumbing/ and scale/,
chosen here once at setup.

  python train.py                              # all stages on the tiny world, then the eval table
  python train.py --help                       # every flag, its default and what it does
  python train.py --preset=smoke               # seconds (used by the tests)
  python train.py --stage=distill --policy=uniform --variant=uniform   # another variant
  python train.py configs/example.json --distill_steps=600
  python train.py --out_dir=out --resume=true  # continue an interrupted run (Ctrl-C saves)

Stage 1 pretrain: the LM on the world's text corpus -> the frozen teacher.
Stage 2 adapt:    VLM = teacher copy + vision tower + projector; align (decoder frozen,
                  train vision + projector), then full fine-tune with CE on vision-heavy
                  image-text data (language degrades, as in the paper).
Stage 3 distill:  from the adapted VLM, CE + source-selective KD from the frozen teacher
                  through the KV handoff (kvshare.py, distill.py), on a mix of all sources.
"""
import copy
import itertools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import data
import distill
import eval as evaluation           # `eval` is a Python builtin: keep the module under another name
import kvshare
import world
from model import SIGLIP2_B16_512, Decoder, LMConfig, VisionConfig, grow_vocab, vlm_from_teacher
from plumbing.checks import (check_config, check_handoff_batch, check_image_size, check_out_dir,
                             check_pack_fits, check_resume_changes, check_student_tokens,
                             check_teacher_tokenizer, stages_to_train, variant_name)
from plumbing.devices import Devices, seed_everything
from plumbing import flops
from plumbing.files import FolderLock, remove_stale_temps, write_json, writing
from plumbing.flags import build_config, config_help, parse_flags, saved_config, wants_help
from plumbing.loop import StageBooks, failure_line, stop_requests, unwrap
from scale import cuda, fused_loss, pack, rope, stream, tiles
from scale.weights import (is_smolvlm_folder, load_hf_lm, load_hf_siglip, load_model_folder,
                           save_hf_lm, save_model_folder, save_vlm, with_student_only_tail)
from tools import oracle


# ----------------------------------------------------------------------------------------
# Config: preset < JSON config files < --key=value. The comments are --help's text.

@dataclass
class TrainConfig:
    # run
    preset: str = "tiny"          # smoke | tiny | paper: a named set of the defaults below
    stage: str = "all"            # pretrain | adapt | distill | all
    out_dir: str = "out"          # models, checkpoints (ckpt/), log.jsonl and run_config.json
    seed: int = 0                 # the tiny world, the initialisation and every batch
    device: str = "auto"          # auto | cpu | cuda
    compile: bool = False         # torch.compile the trained model and the distill teacher
    resume: bool = False          # continue the run in out_dir from its checkpoints and config
    eval: bool = True             # print the evaluation table after the stages (tiny world)
    # tiny world
    n_entities: int = 40          # colour x shape entities, 4..48
    image_size: int = 32          # image side in pixels (the vision tower's input)
    vocab_size: int = 512         # the tiny world's BPE tokenizer
    # models
    lm_dim: int = 128             # teacher / student decoder width
    lm_layers: int = 4            # decoder blocks
    lm_heads: int = 4             # attention heads
    lm_kv_heads: int = 2          # key/value heads (grouped-query attention)
    lm_ffn: int = 384             # SwiGLU hidden width
    vision_dim: int = 64          # vision tower width
    vision_layers: int = 2        # vision tower blocks
    vision_heads: int = 4         # vision tower heads
    patch_size: int = 4           # ViT patch side in pixels
    shuffle_factor: int = 2       # pixel shuffle: factor^2 patches -> one image token
    tower: str = "learned"        # learned | oracle (a control, tools/oracle.py; not the method)
    # stage 1: pretrain
    pretrain_steps: int = 1500    # optimizer steps of the teacher LM
    pretrain_lr: float = 3e-3     # peak learning rate
    seq_len: int = 64             # tokens per pretraining window
    # stage 2: adapt
    align_steps: int = 300        # vision tower + projector only, decoder frozen (0: skip)
    align_lr: float = 3e-3        # peak learning rate of the align step
    adapt_steps: int = 600        # full fine-tune on vision-heavy data
    adapt_lr: float = 1e-3        # decoder learning rate of the fine-tune
    adapt_vision_lr: float = 3e-3  # vision tower + projector learning rate of the fine-tune
    # stage 3: distill
    distill_steps: int = 300      # optimizer steps of LinguDistill
    distill_lr: float = 5e-4      # peak learning rate
    policy: str = "selective"     # none (CE only) | uniform | selective (LinguDistill)
    scope: str = "full"           # full | image | none (text-only teacher)
    alpha: float = 1.0            # loss = CE + alpha * KD
    kd: str = "fkl"               # fkl | rkl | jsd
    temperature: float = 1.0      # KD temperature (T^2 scaling)
    jsd_beta: float = 0.5         # --kd=jsd: mixture weight, in (0, 1)
    kd_chunk: int = 0             # tokens per KD chunk (0: 1024 at a vocabulary >= 8192, else none)
    fused_loss: bool = False      # CE and KD from one student normaliser (scale/fused_loss.py)
    variant: str = ""             # name of the distilled model folder (default: policy-scope)
    # real checkpoints and data (README "Real weights"); empty = the tiny world from scratch
    teacher_path: str = ""        # HF Llama/SmolLM2 folder: the frozen teacher (stage 1 skipped)
    student_path: str = ""        # nanoVLM, SmolVLM / Idefics3 or our VLM folder to start from
    rebase_rope: bool = False     # re-rotate the shared K to the teacher's RoPE base (kvshare)
    vision_path: str = ""         # HF SigLIP folder for a fresh student's vision tower
    data_path: str = ""           # JSONL / Parquet files (comma list) for stages 2-3
    image_root: str = ""          # folder the image paths of data_path are relative to
    kd_sources: str = ""          # comma list of the sources that get KD (default: language)
    skip_bad: bool = False        # skip (and count) bad lines of data_path instead of stopping
    num_workers: int = 2          # DataLoader workers decoding data_path images (0: in-process)
    max_len: int = 2048           # context + response tokens (responses cut); --pack row size
    pack: bool = False            # stages 2-3: examples end to end in --max_len rows, not padded
    image_splitting: bool = False  # nanoVLM's tiles + global view per image (needs --teacher_path)
    image_max_side: int = 2048    # image splitting: the long side after resizing (nanoVLM's 2048)
    grad_checkpointing: bool = False  # recompute the student decoder's blocks in backward
    # optimisation
    batch_size: int = 32          # examples per micro-batch (per DDP rank)
    grad_accum: int = 1           # micro-batches per optimizer step
    warmup_frac: float = 0.05     # linear warmup fraction, then cosine to 10 % of the peak
    weight_decay: float = 0.0     # AdamW weight decay
    grad_clip: float = 1.0        # gradient-norm clip
    max_bad_steps: int = 20       # non-finite losses/grads skipped before the run stops
    max_loss_ratio: float = 3.0   # diverging: 5 steps' loss this x (+1 nat) the 20 before (0: off)
    max_grad_ratio: float = 20.0  # diverging: 5 steps' gradient norm this x the 20 before (0: off)
    # logging / checkpoints
    log_every: int = 10           # steps between progress-bar updates (log.jsonl gets every step)
    ckpt_every: int = 200         # steps between checkpoints (and at each stage's end / Ctrl-C)
    keep_last: int = 2            # checkpoints kept per stage


PRESETS = {
    "tiny": {},
    "smoke": dict(n_entities=8, vocab_size=300, lm_dim=32, lm_layers=2, lm_heads=2, lm_kv_heads=1,
                  lm_ffn=64, vision_dim=32, vision_layers=1, vision_heads=2, pretrain_steps=6,
                  align_steps=3, adapt_steps=3, distill_steps=3, batch_size=4, seq_len=32,
                  log_every=1, ckpt_every=2),
    # The paper's student (nanoVLM-460M): SigLIP2-B/16-512 + pixel shuffle 4 + the decoder of
    # SmolLM2-360M-Instruct (given by --teacher_path).
    "paper": dict(image_size=SIGLIP2_B16_512.image_size, patch_size=SIGLIP2_B16_512.patch_size,
                  vision_dim=SIGLIP2_B16_512.dim, vision_layers=SIGLIP2_B16_512.n_layers,
                  vision_heads=SIGLIP2_B16_512.n_heads, shuffle_factor=4, batch_size=8,
                  grad_accum=4, align_steps=1000, align_lr=1e-3, adapt_steps=4000, adapt_lr=1e-4,
                  adapt_vision_lr=1e-4, distill_steps=1000, distill_lr=5e-5, ckpt_every=500,
                  image_splitting=True),
}
# Keys that may differ between a run and its resumption (README, Training). RUN_KEYS: how long,
# where and how it runs, not what it trains; a resume may also change the learning rates and the
# clip (lower them after a divergence: the schedule goes on) and recompute activations.
RUN_KEYS = {"stage", "resume", "eval", "device", "compile", "log_every", "ckpt_every",
            "keep_last", "max_bad_steps", "max_loss_ratio", "max_grad_ratio", "pretrain_steps",
            "align_steps", "adapt_steps", "distill_steps", "out_dir", "num_workers"}
RESUME_MAY_CHANGE = RUN_KEYS | {"pretrain_lr", "align_lr", "adapt_lr", "adapt_vision_lr",
                                "distill_lr", "grad_clip", "grad_checkpointing"}


@dataclass
class TrainingSetup:
    """What every stage reads, made once by run(): the config, the devices (device, DDP ranks),
    the data (the tiny world, or streamed --data_path files) and the tokenizer."""
    cfg: TrainConfig
    devices: Devices
    data: "world.World | stream.RealData"
    tok: Tokenizer                # with the roles of data.load_tokenizer
    text_stream: torch.Tensor = None      # stage 1: the encoded corpus, (N,)

    def __post_init__(self):
        self.pad_id = data.special_id(self.tok, data.PAD_TOKEN)


# ----------------------------------------------------------------------------------------
# Batches: every batch is a pure function of (seed, stage, step, micro-batch), so the data
# position of a run is just its step and a resumed run sees exactly the same batches.

# The seed of each stage's batch stream (align and adapt are README's stage 2, distill its 3).
BATCH_STREAMS = {"pretrain": 1, "align": 2, "adapt": 3, "distill": 4}


def stage_mixture(examples, stage):
    """Source weights of a stage. align: every image source (decoder frozen, so image tokens
    land where the teacher reads names and descriptions); adapt: vision-heavy only (language
    erodes); distill: every source (vision CE keeps vision, language sources carry the KD).
    Streamed data (which sources hold images is unknown before decoding): align as adapt."""
    if stage == "distill":
        return {s: 1.0 for s in examples.sources}
    vision = [s for s in examples.sources if examples.source_kinds[s] == "vision"]
    if isinstance(examples, stream.RealData):
        return {s: 1.0 for s in vision}
    image_sources = [s for s, ex in examples.sources.items()
                     if any(e["image"] is not None for e in ex)]
    if stage == "align":
        return {s: 1.0 for s in image_sources}
    return {s: 1.0 for s in vision or image_sources}


def rank_slice(items, devices):
    """This rank's share of a global batch (the whole batch without DDP)."""
    n = len(items) // devices.world_size
    return items[devices.rank * n:(devices.rank + 1) * n]


def text_batch(setup, step, micro):
    """Stage 1: random windows of seq_len + 1 tokens of the corpus -> {"tokens": (B, L+1)}."""
    cfg, devices = setup.cfg, setup.devices
    rng = np.random.default_rng([cfg.seed, BATCH_STREAMS["pretrain"], step, micro])
    starts = rng.integers(0, len(setup.text_stream) - cfg.seq_len - 1,
                          size=cfg.batch_size * devices.world_size)
    windows = [setup.text_stream[s:s + cfg.seq_len + 1] for s in rank_slice(starts, devices)]
    return {"tokens": torch.stack(windows)}                                 # (B, L+1)


def get_batch(setup, stage, step, micro, encoded, mixture):
    """Stages 2-3: tiny-world examples (`encoded`) from sources drawn from `mixture`, in
    data.batch_of's layout (or packed rows, --pack=true: scale.pack.batch_of)."""
    cfg, devices = setup.cfg, setup.devices
    rng = np.random.default_rng([cfg.seed, BATCH_STREAMS[stage], step, micro])
    names = sorted(mixture)
    probs = np.array([mixture[s] for s in names], dtype=np.float64)
    probs /= probs.sum()
    picks = [(names[i], rng.random())
             for i in rng.choice(len(names), size=cfg.batch_size * devices.world_size, p=probs)]
    items = [encoded[s][int(u * len(encoded[s]))] for s, u in rank_slice(picks, devices)]
    return pack.batch_of(items, setup.pad_id, cfg.max_len) if cfg.pack else \
        data.batch_of(items, setup.pad_id)


def stage_data(setup, stage, student, start):
    """What a stage's batches come from, made once per stage: (streamed, encoded, mixture): the
    stream of --data_path batches from step `start` on, or the tiny world's examples encoded
    once (data.encode_for_batch, per source: its ~3.6k images are 44 MB of float32 views at the
    default 32 px, ~11 GB at 512 px); the stage's source mixture."""
    cfg, devices = setup.cfg, setup.devices
    if stage == "pretrain":                                 # text windows (text_batch)
        return None, None, None
    mixture = stage_mixture(setup.data, stage)
    if isinstance(setup.data, stream.RealData):
        streamed = setup.data.batches(                    # a pure function of (seed, stage, k)
            student, setup.tok, mixture, f"stage {stage}", cfg.batch_size,
            [cfg.seed, BATCH_STREAMS[stage]], start * cfg.grad_accum, devices.rank,
            devices.world_size, cfg.num_workers, devices.cuda, cfg.pack)
        return streamed, None, mixture
    split = student.image_splitting                          # None in the tiny world
    encoded = {s: [tiles.encode_for_batch(ex, setup.tok, student.n_image_tokens, cfg.image_size,
                                          split) if split else
                   data.encode_for_batch(ex, setup.tok, student.n_image_tokens, cfg.image_size)
                   for ex in setup.data.sources[s]] for s in mixture}
    return None, encoded, mixture


def stage_batches(setup, stage, student, start, args):
    """Each step's micro-batches from `start` on, with (host) token indices, the gate, checks."""
    streamed, encoded, mixture = stage_data(setup, stage, student, start)
    for step in itertools.count(start):
        batches = [next(streamed) if streamed                                      # --data_path
                   else text_batch(setup, step, m) if stage == "pretrain"
                   else get_batch(setup, stage, step, m, encoded, mixture)
                   for m in range(setup.cfg.grad_accum)]
        for b in batches if stage != "pretrain" else []:
            b["ce_index"] = data.flat_index(b["response_mask"])
        for b in batches if stage == "distill" else []:
            w = distill.source_weights(setup.cfg.policy, b["source"], args.kd_table)  # (B,)
            b["kd_weight"] = w[b["token_example"]]                     # (B, R) (packed: (1, N))
            b["kd_index"] = data.flat_index(b["response_mask"] & (b["kd_weight"] > 0))
            if args.prepare_batch:
                args.prepare_batch(b)
        yield batches


def token_counts(batches):
    """The step's CE and (gate-weighted) KD token counts and all its real "tokens", on the host."""
    counts = {"ce": 0.0, "kd": 0.0, "tokens": 0.0}
    for b in batches:
        if "tokens" in b:                                       # stage 1: every next token
            counts["ce"] += b["tokens"][:, 1:].numel()
            counts["tokens"] += b["tokens"][:, 1:].numel()
            continue
        counts["tokens"] += float(b["attention_mask"].sum())
        real = b["response_mask"].float()                                    # (B, R)
        counts["ce"] += float(real.sum())
        counts["kd"] += float((real * b.get("kd_weight", torch.zeros(()))).sum())  # none: 0
    return counts


# ----------------------------------------------------------------------------------------
# One micro-batch of each stage: the loss, then backward. Under DDP the gradients are averaged
# over ranks, so each rank's loss (its share of the global token mean) is scaled by world_size.

@dataclass(frozen=True)
class StepArgs:
    """What a step needs besides the model, the batch and the step's token counts; made by its
    stage (stage 3: stage_distill), never changed."""
    world_size: int = 1                    # DDP ranks (1 without DDP)
    teacher: torch.nn.Module = None        # stage 3: the frozen teacher
    student_only_ids: torch.Tensor = None  # stage 3: ids the teacher never embeds (VLM's)
    loss: dict = None                      # stage 3: distill_loss's options (alpha, kd, T, ...)
    kd_table: dict = None                  # stage 3: source -> KD weight (the source gate)
    prepare_batch: object = None           # stage 3: on the host: check (packed: + plan) a batch
    # the functions of variant_step and response_step, chosen at setup (padded: kvshare's)
    student_prefill: object = kvshare.student_prefill
    teacher_continue: object = kvshare.teacher_continue    # None: no teacher (--policy=none)
    distill_loss: object = distill.distill_loss


def distill_step(student, batch, counts, args):
    """Stage 3, LinguDistill (scope "full", padded): batch["kd_weight"] is the gate, counts the
    step's global token counts (the loss is each micro-batch's share of the step's mean)."""
    # 1. the student prefills: response logits and every layer's K/V
    student_logits, kv = kvshare.student_prefill(student, batch)
    # 2-3. the frozen teacher continues from the student's context K/V
    teacher_logits = kvshare.teacher_continue(args.teacher, kv, batch, args.student_only_ids)
    # 4. CE on every response token + alpha * KD on the tokens the gate gives KD weight
    out = distill.distill_loss(student_logits, batch["labels"], batch["response_mask"],
                               teacher_logits, batch["kd_weight"], **args.loss,
                               ce_tokens=counts["ce"], kd_tokens=counts["kd"],
                               ce_index=batch["ce_index"], kd_index=batch["kd_index"])
    (out["loss"] * args.world_size).backward()
    return out


def variant_step(student, batch, counts, args):
    """distill_step with StepArgs' functions, chosen at setup: packed rows (scale/pack.py), an
    ablation scope (kvshare.SCOPES), no teacher (--policy=none) or the fused loss (scale/)."""
    logits, kv = args.student_prefill(student, batch)
    teacher_logits = None if args.teacher_continue is None else \
        args.teacher_continue(args.teacher, kv, batch, args.student_only_ids)
    out = args.distill_loss(logits, batch["labels"], batch["response_mask"], teacher_logits,
                            batch["kd_weight"], **args.loss, ce_tokens=counts["ce"],
                            kd_tokens=counts["kd"], ce_index=batch["ce_index"],
                            kd_index=batch["kd_index"])
    (out["loss"] * args.world_size).backward()
    return out


def response_step(model, batch, counts, args):
    """Stage 2 (align, adapt): cross-entropy on the response tokens; no teacher."""
    logits, _ = args.student_prefill(model, batch)                         # (B, R, V)
    ce = distill.cross_entropy(logits, batch["labels"], batch["response_mask"], counts["ce"],
                               batch["ce_index"])
    (ce * args.world_size).backward()
    return {"loss": ce, "ce": ce.detach()}


def lm_step(model, batch, counts, args):
    """Stage 1: next-token cross-entropy on text windows."""
    x, y = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    logits, _ = model(x)                                                    # (B, L, V)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
    loss = ce / counts["ce"]
    (loss * args.world_size).backward()
    return {"loss": loss, "ce": loss.detach()}


# ----------------------------------------------------------------------------------------
# The training loop, one for every stage. Its bookkeeping (resume, log.jsonl, checkpoints,
# Ctrl-C, skipped steps) is plumbing.loop.StageBooks.

def lr_schedule(steps, warmup_frac):
    """The learning-rate factor of each step: linear warmup, cosine decay to 10 % of the peak."""
    warmup = max(1, int(steps * warmup_frac))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return factor


def train_stage(setup, stage, model, param_groups, steps, step_fn, args, name=None):
    """`steps` optimizer steps of `stage` on `param_groups`, step_fn(model, batch, counts, args)
    per micro-batch; `name`: its checkpoint folder and log lines (default: the stage)."""
    cfg, devices = setup.cfg, setup.devices
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=devices.cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(steps, cfg.warmup_frac))
    params = [p for g in param_groups for p in g["params"]]
    teacher = None if args.teacher is None else unwrap(args.teacher)
    flops_fn = partial(flops.batch_flops, unwrap(model), teacher) if devices.cuda else None
    books = StageBooks(cfg, devices, stage, name or stage, model, opt, sched, steps,
                       RESUME_MAY_CHANGE, flops_fn)      # resumes from a checkpoint if asked
    batches = stage_batches(setup, stage, unwrap(model), books.start, args)
    model_as_called = torch.compile(model) if cfg.compile else model
    with stop_requests() as stop:
        for step in books.progress_bar():
            # the step's micro-batches and their token counts (the normalisers), on the host
            micro_batches = next(batches)
            counts = devices.sum_over_ranks(token_counts(micro_batches))
            # forward + backward of each micro-batch (DDP all-reduces on the last one)
            logs = {}
            for i, batch in enumerate(micro_batches):
                skip_sync = i < len(micro_batches) - 1
                with devices.no_sync(model_as_called, skip_sync), devices.autocast():
                    out = step_fn(model_as_called, devices.to_device(batch), counts, args)
                for k, v in out.items():                # summed on the device, fetched once
                    logs[k] = logs.get(k, 0.0) + v.detach().double()
            # clip the gradient norm; update, unless the loss or the gradient is not finite
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            logs = books.gather(logs, grad_norm, counts, micro_batches)   # one device sync
            if not books.finite_or_skip(logs):
                opt.zero_grad(set_to_none=True)
                continue
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            # log.jsonl, progress bar, checkpoint; Ctrl-C / SIGTERM stop here
            books.end_step(step, logs, stop.requested)
    books.finish()


# ----------------------------------------------------------------------------------------
# The three stages

def lm_config(cfg, tok):
    return LMConfig(vocab_size=tok.get_vocab_size(), dim=cfg.lm_dim, n_layers=cfg.lm_layers,
                    n_heads=cfg.lm_heads, n_kv_heads=cfg.lm_kv_heads, ffn_dim=cfg.lm_ffn,
                    max_positions=4 * cfg.seq_len + 256)


def vision_config(cfg):
    return VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, dim=cfg.vision_dim,
                        n_layers=cfg.vision_layers, n_heads=cfg.vision_heads,
                        mlp_dim=4 * cfg.vision_dim)


def for_layout(setup, model):
    """The model as the steps call it, chosen once per stage: with the CUDA forms of attention on
    a GPU (scale/cuda.py) and, on packed rows (--pack=true), wrapped in scale.pack.PackedRows."""
    if setup.devices.cuda:
        cuda.use_cuda_attention(model)
    return pack.PackedRows(model) if setup.cfg.pack else model


def stage_pretrain(setup):
    """Stage 1: the teacher LM, trained on text only."""
    cfg, devices = setup.cfg, setup.devices
    model = Decoder(lm_config(cfg, setup.tok)).to(devices.device)
    if devices.cuda:
        cuda.use_cuda_attention(model)
    train_stage(setup, "pretrain", devices.wrap(model),
                [{"params": list(model.parameters()), "lr": cfg.pretrain_lr}], cfg.pretrain_steps,
                lm_step, StepArgs(devices.world_size))
    if devices.is_main:
        save_model_folder(os.path.join(cfg.out_dir, "teacher"), lambda d: save_hf_lm(model, d),
                          setup.tok, asdict(cfg))
    return model


def stage_adapt(setup, teacher):
    """Stage 2: teacher copy + vision tower + projector. Align (decoder frozen), then full
    fine-tune with CE on vision-heavy data: the language ability erodes."""
    cfg, devices = setup.cfg, setup.devices
    vlm = initial_student(cfg, teacher, setup.tok).to(devices.device)
    if cfg.tower == "oracle":                     # the control (tools/oracle.py), not the method
        vlm = oracle.OracleVLM.wrap(vlm, teacher, setup.data, setup.tok)
    vlm.decoder.gradient_checkpointing = cfg.grad_checkpointing
    vision_params = list(vlm.vision.parameters()) + list(vlm.projector.parameters())
    args = StepArgs(devices.world_size,
                    student_prefill=pack.student_prefill if cfg.pack else kvshare.student_prefill)
    vlm.decoder.requires_grad_(False)
    if cfg.align_steps:
        train_stage(setup, "align", devices.wrap(for_layout(setup, vlm)),
                    [{"params": vision_params, "lr": cfg.align_lr}], cfg.align_steps,
                    response_step, args)
    vlm.decoder.requires_grad_(True)
    train_stage(setup, "adapt", devices.wrap(for_layout(setup, vlm)),
                [{"params": list(vlm.decoder.parameters()), "lr": cfg.adapt_lr},
                 {"params": vision_params, "lr": cfg.adapt_vision_lr}], cfg.adapt_steps,
                response_step, args)
    if devices.is_main:
        save_model_folder(os.path.join(cfg.out_dir, "adapted"), lambda d: save_vlm(vlm, d),
                          setup.tok, asdict(cfg))
    return vlm


def distill_setup(setup, teacher, student):
    """Stage 3's step, chosen once: (the student as the step calls it, the step function, its
    StepArgs). The reference distill_step (padded rows, scope full, a teacher), or variant_step
    with the functions of another layout, scope or policy. On CUDA the teacher is held in bf16
    (cast once; no per-step weight casts under autocast)."""
    cfg, devices = setup.cfg, setup.devices
    kvshare.check_compatible(teacher.cfg, student.decoder.cfg, cfg.rebase_rope)  # once, first
    teacher = kvshare.freeze(teacher.to(devices.device), torch.bfloat16 if devices.cuda else None)
    teacher_vocab = teacher.cfg.vocab_size
    only_ids = student.student_only_ids                                   # a tuple of ids
    student.to(devices.device).requires_grad_(True)
    student.decoder.gradient_checkpointing = cfg.grad_checkpointing
    model = for_layout(setup, student)
    if cfg.rebase_rope:                              # the shared K, in the teacher's RoPE base
        model = rope.RebasedRoPE(model, student.decoder.cfg.rope_theta, teacher.cfg.rope_theta)
    teacher = for_layout(setup, teacher)
    teacher = torch.compile(teacher) if cfg.compile else teacher
    if cfg.pack:
        prefill, continue_ = pack.student_prefill, partial(pack.teacher_continue, scope=cfg.scope)
    else:
        prefill, continue_ = kvshare.student_prefill, kvshare.SCOPES[cfg.scope]
    args = StepArgs(
        devices.world_size, teacher, torch.tensor(only_ids, device=devices.device),
        # at a real vocabulary the float32 (tokens, V) softmax temporaries are the loss's peak
        loss=dict(alpha=cfg.alpha, divergence=cfg.kd, temperature=cfg.temperature,
                  beta=cfg.jsd_beta,
                  chunk_size=cfg.kd_chunk or (1024 if teacher_vocab >= 8192 else None)),
        kd_table=distill.table_from_kinds(  # the source gate, once per run (--kd_sources too)
            getattr(setup.data, "gate_kinds", setup.data.source_kinds)),
        prepare_batch=partial(pack.plan_teacher if cfg.pack else check_handoff_batch,
                              student_only_ids=only_ids, teacher_vocab_size=teacher_vocab,
                              scope=cfg.scope),
        student_prefill=prefill, teacher_continue=None if cfg.policy == "none" else continue_,
        distill_loss=fused_loss.fused_distill_loss if cfg.fused_loss else distill.distill_loss)
    reference = not (cfg.pack or cfg.fused_loss) and cfg.scope == "full" and cfg.policy != "none"
    return model, distill_step if reference else variant_step, args


def stage_distill(setup, teacher, student):
    """Stage 3: CE + source-selective KD from the frozen teacher through the KV handoff."""
    cfg, devices = setup.cfg, setup.devices
    model, step_fn, args = distill_setup(setup, teacher, student)
    train_stage(setup, "distill", devices.wrap(model),
                [{"params": list(student.parameters()), "lr": cfg.distill_lr}], cfg.distill_steps,
                step_fn, args, name=f"distill-{variant_name(cfg)}")
    if devices.is_main:
        save_model_folder(os.path.join(cfg.out_dir, f"distilled-{variant_name(cfg)}"),
                          lambda d: save_vlm(student, d), setup.tok, asdict(cfg))
    return student


# ----------------------------------------------------------------------------------------
# Setup: models and data to start from, checks before any work

def initial_student(cfg, teacher, tok):
    """The VLM that stage 2 starts from: --student_path (nanoVLM or ours), or the teacher's
    decoder (vocabulary grown for <image> and, with --image_splitting, the grid tokens) + a
    vision tower (--vision_path or fresh) + a fresh projector."""
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    view_ids = [tok.token_to_id(t) for t in tiles.VIEW_TOKENS] if cfg.image_splitting else []
    if cfg.student_path:
        vlm = load_model_folder(cfg.student_path, image_token_id=image_id)
        check_student_tokens(vlm, tok, cfg.student_path)
        if isinstance(vlm.image_splitting, tiles.Idefics3Splitting):     # SmolVLM / Idefics3
            check_image_size(vlm, cfg)
            kvshare.check_compatible(teacher.cfg, vlm.decoder.cfg, cfg.rebase_rope)  # at setup
            with_student_only_tail(vlm, teacher.cfg.vocab_size)  # ids past the teacher's
        return vlm
    vision = load_hf_siglip(cfg.vision_path) if cfg.vision_path else None
    splitting = tiles.ImageSplitting(max_side=cfg.image_max_side) if cfg.image_splitting else None
    vlm = vlm_from_teacher(grow_vocab(teacher, tok.get_vocab_size()),
                           vision.cfg if vision else vision_config(cfg), image_id,
                           cfg.shuffle_factor, view_ids, splitting)
    if vision:
        vlm.vision.load_state_dict(vision.state_dict())
    return vlm


def build_data_and_tokenizer(cfg):
    """The data (the tiny world, or --data_path) and the tokenizer (trained on the tiny
    world's corpus, or the teacher's own)."""
    if cfg.data_path:
        examples = stream.RealData(cfg.data_path.split(","), cfg.image_size, cfg.max_len or None,
                                   cfg.image_root or None, cfg.skip_bad,
                                   [s for s in cfg.kd_sources.split(",") if s])
    else:
        examples = world.build_world(cfg.seed, n_entities=cfg.n_entities,
                                     image_size=cfg.image_size,
                                     kd_sources=[s for s in cfg.kd_sources.split(",") if s])
    if cfg.teacher_path and is_smolvlm_folder(cfg.student_path):
        # a SmolVLM student reads its own tokenizer (image-layout tokens past the teacher's ids);
        # the teacher's must agree on the shared prefix, which KD compares
        tok = data.load_tokenizer(os.path.join(cfg.student_path, "tokenizer.json"))
        check_teacher_tokenizer(cfg.teacher_path, tok, "--teacher_path")
    elif cfg.teacher_path:
        tok = data.load_tokenizer(os.path.join(cfg.teacher_path, "tokenizer.json"),
                                  extra_tokens=tiles.VIEW_TOKENS if cfg.image_splitting else ())
    else:
        tok = data.train_tokenizer(examples.corpus, cfg.vocab_size)
    return examples, tok


def get_config(argv):
    """The run's config from the command line. `--out_dir=X --resume=true [--key=value ...]`
    without --preset or a config file continues run X from its own config (X/run_config.json)
    in place of the preset defaults, changing only the flags given, which must be keys a resume
    may change (RESUME_MAY_CHANGE; any other is refused by name). With --preset or a config file
    the config is built from them as usual (the experiment tools: several variants in one
    folder), and each stage's checkpoint refuses a config that changes what it trains
    (Checkpoints.load, checked before any work)."""
    overrides, files = parse_flags(argv, TrainConfig)
    saved = None
    path = os.path.join(overrides.get("out_dir", TrainConfig.out_dir), "run_config.json")
    if overrides.get("resume") and not files and "preset" not in overrides \
            and os.path.isfile(path):
        saved = saved_config(TrainConfig, path)
    cfg = build_config(TrainConfig, PRESETS, overrides, files, base=saved)
    check_config(cfg)
    if saved is not None:
        check_resume_changes(saved, cfg, overrides, RESUME_MAY_CHANGE, path)
    return cfg


def run(cfg):
    """Run the configured stages. Returns (models, data, tok): models maps "teacher",
    "adapted" and "distilled-<variant>" to what the stages trained or loaded. One run per
    out_dir: rank 0 holds its lock (devices.FolderLock) from the checks to the end."""
    with FolderLock(cfg.out_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        check_out_dir(cfg, RESUME_MAY_CHANGE)
        return train_stages(cfg)


def train_stages(cfg):
    devices = Devices(cfg.device)
    seed_everything(cfg.seed)
    examples, tok = build_data_and_tokenizer(cfg)
    check_pack_fits(cfg, examples, tok)
    setup = TrainingSetup(cfg, devices, examples, tok)
    if "pretrain" in stages_to_train(cfg):
        setup.text_stream = data.encode_corpus(examples.corpus, tok)           # (N,)
        if len(setup.text_stream) < cfg.seq_len + 2:
            raise ValueError(f"--seq_len={cfg.seq_len} is longer than the whole text corpus "
                             f"({len(setup.text_stream)} tokens)")
    os.makedirs(cfg.out_dir, exist_ok=True)          # only once the data and the inputs are good
    if devices.is_main:
        run_config = os.path.join(cfg.out_dir, "run_config.json")
        with writing("the run's config", run_config):
            write_json(run_config, asdict(cfg))
        for name in remove_stale_temps(cfg.out_dir):       # of a save that a kill interrupted
            print(f"train.py: removed {name} from {cfg.out_dir}: what a killed save left",
                  file=sys.stderr)
    t0, models = time.time(), {}
    teacher_dir = os.path.join(cfg.out_dir, "teacher")
    adapted_dir = os.path.join(cfg.out_dir, "adapted")
    if cfg.teacher_path:
        models["teacher"] = load_hf_lm(cfg.teacher_path).to(devices.device)
    elif cfg.stage in ("pretrain", "all"):
        models["teacher"] = stage_pretrain(setup)
    else:
        check_teacher_tokenizer(teacher_dir, tok, "the teacher folder")
        models["teacher"] = load_hf_lm(teacher_dir).to(devices.device)
    if cfg.stage in ("adapt", "all"):
        models["adapted"] = stage_adapt(setup, models["teacher"])
    elif cfg.stage == "distill":
        # from the adapted model of an earlier run, else (real checkpoints) the initial student
        if os.path.isdir(adapted_dir) or not cfg.teacher_path:
            start = load_model_folder(adapted_dir)
            check_student_tokens(start, tok, adapted_dir)
            if cfg.tower == "oracle":
                start = oracle.OracleVLM.wrap(start, models["teacher"], examples, tok)
        else:
            start = initial_student(cfg, models["teacher"], tok)
        models["adapted"] = start.to(devices.device)
    if cfg.stage in ("distill", "all"):
        student = copy.deepcopy(models["adapted"]) if cfg.stage == "all" else models.pop("adapted")
        models[f"distilled-{variant_name(cfg)}"] = stage_distill(setup, models["teacher"], student)
    devices.barrier()                        # every rank waits for rank 0's saves before going on
    if devices.is_main:
        print(f"stages {cfg.stage} done in {time.time() - t0:.1f}s on {devices.device}; "
              f"models in {cfg.out_dir}/")
    return models, examples, tok


USAGE = ("usage: python train.py [CONFIG.json ...] [--key=value ...]\n"
         "LinguDistill: pretrain the teacher LM, adapt it into a VLM, distill language back "
         "through the KV handoff.")


def main(argv):
    """Bad input (config, files, checkpoints), a stage that cannot go on, a full disk, memory
    running out, another DDP process failing and Ctrl-C end with one line on stderr and exit
    status 1 (under torchrun each process says which it is), not a traceback; anything unexpected
    keeps its traceback. Ctrl-C / SIGTERM save a checkpoint and print the command that resumes."""
    if wants_help(argv):
        print(config_help(TrainConfig, PRESETS, USAGE))
        return
    cfg = None
    try:
        cfg = get_config(argv)
        models, examples, tok = run(cfg)
    except BaseException as e:
        line = failure_line(e, cfg)
        if line is None:                              # not ours to say: its traceback
            raise
        sys.exit(line)
    if cfg.eval and int(os.environ.get("RANK", "0")) == 0 and examples.language_bench:
        rows = evaluation.evaluate_models(models, examples, tok, cfg.image_size)
        print(evaluation.format_table(rows))
        for name in [n for n in rows if n.startswith("distilled") and "adapted" in rows]:
            print(f"recovery of {name}: {100 * evaluation.recovery(rows, name):.0f} % of the "
                  "language the adaptation lost (one draw: README's Results give the range)")


if __name__ == "__main__":
    main(sys.argv[1:])
