"""
LinguDistill in three stages. Reads top to bottom like nanoGPT's train.py: the config, the
setup, the batches and losses of each stage, the one training loop, the stages, main.

  python train.py                              # all stages on the tiny world, then the eval table
  python train.py --preset=smoke               # seconds (used by the tests)
  python train.py --stage=distill --policy=uniform --scope=full
  python train.py configs/my_run.json --distill_steps=600

Stage 1 pretrain: the LM on the world's text corpus -> the frozen teacher.
Stage 2 adapt:    VLM = teacher copy + vision tower + projector; align (decoder frozen,
                  train vision + projector), then full fine-tune with CE on vision-heavy
                  image-text data (language degrades, as in the paper).
Stage 3 distill:  from the adapted VLM, CE + source-selective KD from the frozen teacher
                  through the KV handoff (kvshare.py, distill.py), on a mix of all sources.
"""
import ast
import copy
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import distill
import kvshare
import eval as evaluation           # `eval` is a Python builtin: keep the module under another name
from model import (SIGLIP2_B16_512, Decoder, ImageSplitting, LMConfig, VisionConfig, grow_vocab,
                   unwrap, vlm_from_teacher)
from weights import (atomic_write, current_umask, load_hf_lm, load_hf_siglip, load_model_folder,
                     save_hf_lm, save_vlm, write_json, write_text)


# ----------------------------------------------------------------------------------------
# Config: preset < JSON config files < --key=value

@dataclass
class TrainConfig:
    # run
    preset: str = "tiny"          # smoke | tiny | paper: a named set of the defaults below
    stage: str = "all"            # pretrain | adapt | distill | all
    out_dir: str = "out"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    compile: bool = False         # torch.compile the trained model and the distill teacher
    resume: bool = False          # continue each stage from its last checkpoint in out_dir/ckpt
    eval: bool = True             # print the evaluation table after the stages
    # tiny world
    n_entities: int = 40
    image_size: int = 32
    vocab_size: int = 512
    # models
    lm_dim: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_ffn: int = 384
    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 4
    shuffle_factor: int = 2
    # stage 1: pretrain
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    seq_len: int = 64
    # stage 2: adapt
    align_steps: int = 300
    align_lr: float = 3e-3
    adapt_steps: int = 600
    adapt_lr: float = 1e-3        # decoder
    adapt_vision_lr: float = 3e-3
    # stage 3: distill
    distill_steps: int = 300
    distill_lr: float = 5e-4
    policy: str = "selective"     # none (CE only) | uniform | selective (LinguDistill)
    scope: str = "full"           # full | image | none (text-only teacher)
    alpha: float = 1.0
    kd: str = "fkl"               # fkl | rkl | jsd
    temperature: float = 1.0
    jsd_beta: float = 0.5
    kd_chunk: int = 0             # tokens per KD chunk (0 = no chunking)
    variant: str = ""             # name of the distilled model folder (default: policy-scope)
    # real checkpoints (README "Run on real weights"); empty = the tiny world from scratch
    teacher_path: str = ""        # HF Llama/SmolLM2 folder: the frozen teacher (stage 1 skipped)
    student_path: str = ""        # nanoVLM or our VLM folder to start from
    vision_path: str = ""         # HF SigLIP folder for a fresh student's vision tower
    data_path: str = ""           # LLaVA-style JSONL for stages 2-3 (else the tiny world)
    image_root: str = ""          # folder the image paths of data_path are relative to
    kd_sources: str = ""          # comma list of data_path sources that get KD
    skip_bad: bool = False        # skip (and count) bad lines of data_path instead of stopping
    num_workers: int = 2          # DataLoader workers decoding data_path images (0: in-process)
    max_len: int = 2048           # data_path: context + response tokens; longer responses are cut
    image_splitting: bool = False  # nanoVLM's tiles + global view per image (needs --teacher_path)
    image_max_side: int = 2048    # image splitting: the long side after resizing (nanoVLM's 2048)
    grad_checkpointing: bool = False  # recompute the student decoder's blocks in backward
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 20       # non-finite losses/grads skipped before the run stops
    # logging / checkpoints
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2


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
STAGES = ("pretrain", "adapt", "distill", "all")


def parse_value(f, text):
    if f.type in (bool, "bool"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{f.name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{f.name}: expected {typ.__name__}, got {text!r}") from None


def check_json_value(f, value, path):
    """A value from a JSON config file must already have the field's type (no "false" strings)."""
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
    ok = type(value) is typ or (typ is float and type(value) is int)
    if not ok:
        raise ValueError(
            f"config file {path}: {f.name!r} is {json.dumps(value)}, expected a JSON "
            f"{ {int: 'integer', float: 'number', str: 'string', bool: 'true/false'}[typ] }")
    return float(value) if typ is float else value


def get_config(argv):
    known = {f.name: f for f in fields(TrainConfig)}
    overrides, files = {}, []
    for arg in argv:
        if not arg.startswith("--"):
            files.append(arg)
            continue
        key, eq, val = arg[2:].partition("=")
        if key not in known:
            raise ValueError(f"unknown config key --{key}; expected one of: {', '.join(known)}")
        if not eq:
            raise ValueError(f"--{key}: expected --{key}=value")
        if key in overrides:
            raise ValueError(f"--{key} given twice; give each flag once")
        overrides[key] = parse_value(known[key], val)
    from_files = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"config file {path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {path}: expected a JSON object of config keys, found "
                             f"{type(d).__name__}")
        bad = sorted(set(d) - set(known))
        if bad:
            raise ValueError(f"config file {path}: unknown key(s) {bad}")
        from_files.update({k: check_json_value(known[k], v, path) for k, v in d.items()})
    preset = overrides.get("preset", from_files.get("preset", "tiny"))
    if preset not in PRESETS:
        raise ValueError(f"--preset={preset!r}; expected one of {sorted(PRESETS)}")
    cfg = replace(TrainConfig(), **{**PRESETS[preset], **from_files, **overrides, "preset": preset})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Every flag is checked here, before any work starts; each error names the flag."""
    choices = {"stage": STAGES, "policy": distill.POLICIES, "scope": kvshare.SCOPES,
               "kd": distill.DIVERGENCES, "device": ("auto", "cpu", "cuda")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}; expected one of {list(ok)}")
    at_least = {"batch_size": 1, "grad_accum": 1, "seq_len": 1, "log_every": 1, "ckpt_every": 1,
                "keep_last": 1, "pretrain_steps": 1, "align_steps": 0, "adapt_steps": 1,
                "distill_steps": 1, "kd_chunk": 0, "max_bad_steps": 0, "num_workers": 0,
                "max_len": 0, "vocab_size": 256 + len(data.SPECIAL_TOKENS), "lm_dim": 1,
                "lm_layers": 1, "lm_heads": 1, "lm_kv_heads": 1, "lm_ffn": 1, "vision_dim": 1,
                "vision_layers": 1, "vision_heads": 1, "patch_size": 1, "image_size": 1,
                "shuffle_factor": 1, "image_max_side": 1}
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise ValueError(f"--{key} must be >= {low}, got {getattr(cfg, key)}")
    positive = ("pretrain_lr", "align_lr", "adapt_lr", "adapt_vision_lr", "distill_lr",
                "temperature", "grad_clip")
    for key in positive:
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) > 0):
            raise ValueError(f"--{key} must be a finite number > 0, got {getattr(cfg, key)}")
    for key in ("alpha", "weight_decay"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise ValueError(f"--{key} must be a finite number >= 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.warmup_frac < 1:
        raise ValueError(f"--warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    if cfg.kd == "jsd" and not 0 < cfg.jsd_beta < 1:
        raise ValueError(f"--jsd_beta must be in (0, 1) for --kd=jsd, got {cfg.jsd_beta}")
    if not 4 <= cfg.n_entities <= len(data.COLOURS) * len(data.SHAPES):
        raise ValueError(f"--n_entities must be in [4, {len(data.COLOURS) * len(data.SHAPES)}] "
                         f"(colour x shape), got {cfg.n_entities}")
    for whole, part in (("lm_dim", "lm_heads"), ("lm_heads", "lm_kv_heads"),
                        ("vision_dim", "vision_heads"), ("image_size", "patch_size")):
        if getattr(cfg, whole) % getattr(cfg, part):
            raise ValueError(f"--{whole}={getattr(cfg, whole)} must be divisible by --{part}="
                             f"{getattr(cfg, part)}")
    if (cfg.lm_dim // cfg.lm_heads) % 2:
        raise ValueError(f"--lm_dim / --lm_heads = {cfg.lm_dim // cfg.lm_heads} must be even (RoPE "
                         "rotates pairs)")
    grid = cfg.image_size // cfg.patch_size
    if grid % cfg.shuffle_factor:
        raise ValueError(f"--shuffle_factor={cfg.shuffle_factor} must divide the patch grid "
                         f"{grid} (--image_size / --patch_size)")
    if cfg.preset == "paper" and not cfg.teacher_path:
        raise ValueError("--preset=paper needs --teacher_path=FOLDER (a SmolLM2-360M-Instruct HF "
                         "folder)")
    if cfg.image_splitting:
        try:
            ImageSplitting(max_side=cfg.image_max_side).check_tile(cfg.image_size)
        except ValueError as e:
            raise ValueError(f"--image_max_side / --image_size: {e}") from None
        if not cfg.teacher_path:
            raise ValueError("--image_splitting=true needs --teacher_path: the tiny world's "
                             "tokenizer has no grid tokens")
    if cfg.data_path and not cfg.teacher_path:
        raise ValueError("--data_path needs --teacher_path: stage 1 trains a teacher only on the "
                         "tiny world's text")
    if cfg.teacher_path and cfg.stage == "pretrain":
        raise ValueError("--stage=pretrain trains a teacher; with --teacher_path the teacher is "
                         "given")
    for key in ("teacher_path", "student_path", "vision_path", "image_root"):
        path = getattr(cfg, key)
        if path and not os.path.exists(path):
            raise ValueError(f"--{key}={path}: no such file or folder")
        if path and not os.path.isdir(path):
            raise ValueError(f"--{key}={path}: a file; expected a folder")
    for path in filter(None, cfg.data_path.split(",")):
        if not os.path.isfile(path) or not path.endswith((".jsonl", ".parquet")):
            raise ValueError(f"--data_path: {path} is not a .jsonl or .parquet file")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir={cfg.out_dir} is a file; expected a folder")


def variant_name(cfg):
    return cfg.variant or f"{cfg.policy}-{cfg.scope}"


# ----------------------------------------------------------------------------------------
# Setup: device, precision, DDP, seeds

class Runtime:
    """Device, precision and (under torchrun) the DDP process group."""

    def __init__(self, cfg):
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda but no CUDA device is available")
        self.cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank, self.world_size = 0, 1
        if self.ddp:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.cuda else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.is_main = self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA, plain fp32 on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def to_device(self, batch):
        """Move a batch to the device (pinned host memory + async copy on CUDA)."""
        def move(v):
            if not torch.is_tensor(v) or not self.cuda:
                return v
            return v.pin_memory().to(self.device, non_blocking=True)
        return {k: move(v) for k, v in batch.items()}

    def wrap(self, model):
        if not self.ddp:
            return model
        # text-only batches leave the vision tower without gradients: let DDP allow that
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None,
                                       find_unused_parameters=True)

    def no_sync(self, model, skip_sync):
        """Gradient accumulation under DDP: all-reduce gradients only on the last micro-batch."""
        return model.no_sync() if self.ddp and skip_sync else nullcontext()

    def sum_over_ranks(self, values):
        """{name: float} summed over DDP ranks (unchanged without DDP)."""
        if not self.ddp:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist()))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    state = {"python": repr(random.getstate()),
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": np_state[2], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(ast.literal_eval(state["python"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(steps, warmup_frac):
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, int(steps * warmup_frac))

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------------------
# Checkpoints: {model, optimizer, scheduler, step, config, rng, bad_steps}, written atomically

# Keys that may differ between a checkpoint and the run resuming it: how long, where and how
# a run goes, not what it trains.
RUN_KEYS = {"stage", "resume", "eval", "device", "compile", "log_every", "ckpt_every", "keep_last",
            "max_bad_steps", "pretrain_steps", "align_steps", "adapt_steps", "distill_steps",
            "out_dir", "num_workers"}
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "step", "config", "rng", "bad_steps"}


class TrainingError(RuntimeError):
    """A stage cannot go on (non-finite losses past --max_bad_steps, no good step at all)."""


class Checkpoints:
    """ckpt/<stage>/step_NNNNNNN.pt, written atomically; the newest keep_last are kept."""

    def __init__(self, folder, keep_last):
        self.folder, self.keep_last = folder, keep_last

    def paths(self):
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, f) for f in os.listdir(self.folder)
                      if f.startswith("step_") and f.endswith(".pt"))

    def remove_orphans(self):
        """Temp files a kill left behind mid-write (never a complete checkpoint)."""
        if os.path.isdir(self.folder):
            for f in os.listdir(self.folder):
                if f.startswith(".tmp-"):
                    os.remove(os.path.join(self.folder, f))

    def save(self, step, state):
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"step_{step:07d}.pt")
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        older = [p for p in self.paths() if p < path]          # never the one just written
        for old in older[:max(0, len(older) - (self.keep_last - 1))]:
            os.remove(old)

    def load(self, path, cfg):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is truncated or corrupt "
                             f"({type(e).__name__}: {e})") from None
        missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else ["all"]
        if missing:
            raise ValueError(f"checkpoint {path} is not a train.py checkpoint: missing {missing}")
        ours = asdict(cfg)
        diffs = [f"{k}: checkpoint {v!r} vs run {ours.get(k)!r}"
                 for k, v in state["config"].items() if k not in RUN_KEYS and ours.get(k) != v]
        if diffs:
            raise ValueError(f"checkpoint {path} comes from another config:\n  "
                             + "\n  ".join(diffs))
        return state


# ----------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, stage, step, micro-batch), so the data
# position of a run is just its step and a resumed run sees exactly the same batches.

STAGE_IDS = {"pretrain": 1, "align": 2, "adapt": 3, "distill": 4}


def batch_rng(cfg, stage, step, micro):
    return np.random.default_rng([cfg.seed, STAGE_IDS[stage], step, micro])


def rank_slice(items, rt):
    """This rank's share of a global batch (the whole batch without DDP)."""
    n = len(items) // rt.world_size
    return items[rt.rank * n:(rt.rank + 1) * n]


def stage_mixture(world, stage):
    """Source weights of a stage. align: every image source (decoder frozen, so image tokens
    land where the teacher reads names and descriptions); adapt: vision-heavy only (language
    erodes); distill: every source (vision CE keeps vision, language sources carry the KD).
    Streamed real data (data.RealData) does not know which sources hold images before decoding
    them: there align uses the vision-heavy sources, like adapt."""
    if stage == "distill":
        return {s: 1.0 for s in world.sources}
    vision = [s for s in world.sources if world.source_kinds[s] == "vision"]
    if isinstance(world, data.RealData):
        return {s: 1.0 for s in vision}
    image_sources = [s for s,
                     ex in world.sources.items() if any(e["image"] is not None for e in ex)]
    if stage == "align":
        return {s: 1.0 for s in image_sources}
    return {s: 1.0 for s in vision or image_sources}


@dataclass
class Run:
    """What every stage reads: the config, the runtime, the data and (stage 3) the teacher."""
    cfg: TrainConfig
    rt: Runtime
    world: object                 # data.World (tiny world) or data.RealData (--data_path)
    tok: object                   # tokenizers.Tokenizer with the roles of data.load_tokenizer
    text_stream: torch.Tensor = None      # stage 1: the encoded corpus, (N,)
    teacher: Decoder = None               # stage 3: the frozen teacher
    kd_table: dict = None                 # stage 3: source -> KD weight


def get_batch(run, stage, step, micro, student=None, mixture=None):
    """Stage 1: random windows of seq_len + 1 tokens of the corpus -> {"tokens": (B, L+1)}.
    Stages 2-3: image-text examples, each example's source drawn from `mixture` (the stage's
    stage_mixture), in the layout of data.collate (contexts left-padded to P, responses
    right-padded to R) for `student`."""
    cfg, rt = run.cfg, run.rt
    rng = batch_rng(cfg, stage, step, micro)
    global_batch = cfg.batch_size * rt.world_size
    if stage == "pretrain":
        starts = rng.integers(0, len(run.text_stream) - cfg.seq_len - 1, size=global_batch)
        windows = [run.text_stream[s:s + cfg.seq_len + 1] for s in rank_slice(starts, rt)]
        return {"tokens": torch.stack(windows)}                             # (B, L+1)
    names = sorted(mixture)
    probs = np.array([mixture[s] for s in names], dtype=np.float64)
    probs /= probs.sum()
    picks = [(names[i], rng.random()) for i in rng.choice(len(names), size=global_batch, p=probs)]
    examples = [run.world.sources[s][int(u * len(run.world.sources[s]))]
                for s, u in rank_slice(picks, rt)]
    return data.collate(examples, run.tok, student.n_image_tokens, cfg.image_size,
                        image_splitting=student.image_splitting)


def stream_batches(run, stage, student, mixture, start_step):
    """Streamed real data: this rank's micro-batches from optimizer step start_step on. The
    examples of global micro-batch k are a pure function of (seed, stage, k) (data.make_loader),
    so a resumed run reads exactly the batches the uninterrupted run would have."""
    cfg, rt = run.cfg, run.rt
    dataset = run.world.open(student, run.tok)
    indices = dataset.indices_of(mixture)
    if not indices:
        raise ValueError(f"--data_path has no examples for stage {stage} (sources "
                         f"{sorted(mixture)})")
    loader = data.make_loader(torch.utils.data.Subset(dataset, indices), cfg.batch_size,
                              seed=[cfg.seed, STAGE_IDS[stage]],
                              start_step=start_step * cfg.grad_accum, rank=rt.rank,
                              world_size=rt.world_size, num_workers=cfg.num_workers,
                              collate_fn=dataset.collate, pin_memory=rt.cuda,
                              timeout=600 if cfg.num_workers else 0)
    for batch in loader:
        yield {k: v for k, v in batch.items() if k not in ("index", "errors")}


def token_counts(run, stage, batch):
    """{"ce": n, "kd": n}: the tokens the CE and KD terms average over (KD tokens weighted by
    their source's KD weight). Summed over micro-batches and ranks, they are the normalisers."""
    if stage == "pretrain":
        return {"ce": batch["tokens"][:, 1:].numel(), "kd": 0.0}
    real = batch["response_mask"].float()                                   # (B, R)
    kd = 0.0
    if stage == "distill":
        gate = distill.source_weights(run.cfg.policy, batch["source"], run.kd_table)   # (B,)
        kd = float((real * gate.to(real.device)[:, None]).sum())
    return {"ce": float(real.sum()), "kd": kd}


def compute_loss(run, stage, model, batch, counts, teacher=None):
    """The loss of one micro-batch, already divided by the global token counts. teacher: the
    frozen teacher to call in stage 3 (default run.teacher; train_stage passes its compiled
    wrapper under --compile)."""
    if stage == "pretrain":                                                 # next-token CE
        x, y = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        logits, _ = model(x)                                                # (B, L, V)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        return {"loss": ce / counts["ce"], "ce": ce.detach() / counts["ce"]}
    if stage in ("align", "adapt"):                                         # CE on the responses
        logits, _ = kvshare.student_prefill(model, batch)                   # (B, R, V)
        out = distill.distill_loss(logits, batch["labels"], batch["response_mask"],
                                   policy="none", ce_normalizer=counts["ce"])
        return {"loss": out["loss"], "ce": out["ce"]}
    cfg = run.cfg                                                          # CE + KD via the handoff
    student_logits, teacher_logits = kvshare.distill_forward(
        model, run.teacher if teacher is None else teacher, batch, unwrap(model).student_only_ids,
        cfg.scope, need_teacher=cfg.policy != "none")
    out = distill.distill_loss(
        student_logits, batch["labels"], batch["response_mask"], teacher_logits,
        sources=batch["source"], policy=cfg.policy, table=run.kd_table, alpha=cfg.alpha,
        divergence=cfg.kd, temperature=cfg.temperature, beta=cfg.jsd_beta,
        chunk_size=cfg.kd_chunk or None, ce_normalizer=counts["ce"], kd_normalizer=counts["kd"])
    return {"loss": out["loss"], "ce": out["ce"], "kd": out["kd"]}


# ----------------------------------------------------------------------------------------
# The training loop, one for every stage

def train_stage(run, stage, model, param_groups, steps, name=None):
    """Train `model` (the parameters in `param_groups`) for `steps` optimizer steps of
    `stage` ("pretrain" | "align" | "adapt" | "distill"); `name` names its checkpoint folder
    and log lines (default: the stage). A step whose loss or gradient is not finite is
    skipped (never saved); past --max_bad_steps skipped steps, or with no good step at all,
    the stage stops with a TrainingError. Returns the per-step log records."""
    cfg, rt, name = run.cfg, run.rt, name or stage
    params = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=rt.cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.warmup_frac))
    ckpts = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    start, bad_steps, skipped_examples = 0, 0, 0
    if rt.is_main:
        ckpts.remove_orphans()
    if cfg.resume and ckpts.paths():
        state = ckpts.load(ckpts.paths()[-1], cfg)
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, bad_steps = state["step"], state["bad_steps"]
        set_rng_state(state["rng"])
        if rt.is_main:
            drop_log_records(log_path, name, after_step=start)   # steps the crash had logged
    # A fresh compile per stage: no graph traced while other parameters were frozen is reused.
    # Stage 3 also compiles the frozen teacher's forward (its continuation over the student's KV);
    # the wrapper is local to the stage: run.teacher stays the plain module.
    if cfg.compile:
        torch.compiler.reset()
    forward_model = torch.compile(model) if cfg.compile else model
    teacher = run.teacher
    if cfg.compile and stage == "distill" and teacher is not None:
        teacher = torch.compile(teacher)
    student, mixture, stream = None, None, None
    if stage != "pretrain":
        student, mixture = unwrap(model), stage_mixture(run.world, stage)   # once per stage
        if isinstance(run.world, data.RealData):
            stream = stream_batches(run, stage, student, mixture, start)
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps,
               disable=not rt.is_main, leave=False)
    history, t_start = [], time.time()
    for step in bar:
        batches = [next(stream) if stream else get_batch(run, stage, step, micro, student, mixture)
                   for micro in range(cfg.grad_accum)]
        skipped_examples += sum(b.pop("skipped", 0) + b.pop("dropped", 0) for b in batches)
        batches = [rt.to_device(b) for b in batches]
        # the loss normalisers: token counts over every micro-batch of every rank
        counts = {"ce": 0.0, "kd": 0.0}
        for batch in batches:
            for k, v in token_counts(run, stage, batch).items():
                counts[k] += v
        counts = rt.sum_over_ranks(counts)
        logs = {}
        for micro, batch in enumerate(batches):
            with rt.no_sync(forward_model, micro < len(batches) - 1), rt.autocast():
                out = compute_loss(run, stage, forward_model, batch, counts, teacher)
                (out["loss"] * rt.world_size).backward()      # DDP averages grads over ranks
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        logs["tokens"] = float(sum(b["attention_mask"].sum() if "attention_mask" in b
                                   else b["tokens"][:, 1:].numel() for b in batches))
        logs = rt.sum_over_ranks(logs)        # each rank's loss is its share of the global mean
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not (math.isfinite(logs["loss"]) and torch.isfinite(grad_norm)):
            bad_steps += 1
            opt.zero_grad(set_to_none=True)
            if bad_steps > cfg.max_bad_steps:
                last = ckpts.paths()[-1] if ckpts.paths() else "none was written"
                raise TrainingError(f"{name}: {bad_steps} steps with non-finite loss or gradients "
                                    f"(limit --max_bad_steps={cfg.max_bad_steps}); last good "
                                    f"checkpoint: {last}; no model folder saved for this stage")
            continue
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record = {"stage": name, "step": step + 1, "time": round(time.time() - t_start, 4),
                  "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "bad_steps": bad_steps, "skipped_examples": skipped_examples, **logs}
        if rt.cuda:
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        history.append(record)
        if rt.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k != "tokens"})
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == steps:
                ckpts.save(step + 1, {"model": unwrap(model).state_dict(),
                                      "optimizer": opt.state_dict(),
                                      "scheduler": sched.state_dict(), "step": step + 1,
                                      "bad_steps": bad_steps, "config": asdict(cfg),
                                      "rng": rng_state()})
    if bad_steps >= steps:
        raise TrainingError(f"{name}: all {steps} steps had a non-finite loss or gradients; "
                            "no model folder saved for this stage")
    if rt.is_main:
        print(f"{name}: {steps - start} steps, {bad_steps} skipped (non-finite loss or "
              f"gradients)" + (f", {skipped_examples} examples replaced (bad or too long)"
                               if skipped_examples else ""))
    return history


def drop_log_records(log_path, name, after_step):
    """Remove the log lines of stage `name` past `after_step` (a resumed run logs them again)."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    records = [json.loads(line) for line in lines]
    keep = [line for line, r in zip(lines, records)
            if not (r.get("stage") == name and r["step"] > after_step)]
    if len(keep) != len(lines):
        write_text(log_path, "".join(keep))


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


def save_model_folder(run, folder, save_weights):
    """A model folder: weights + config (HF layout or ours) + tokenizer + train_config.json,
    written into a temp folder beside it and renamed into place, so `folder` is always one
    complete model (an older one at that path is replaced only once the new one is whole)."""
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(folder)}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        save_weights(tmp)
        data.save_tokenizer(run.tok, tmp)
        write_json(os.path.join(tmp, "train_config.json"), asdict(run.cfg))
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(folder)}-", dir=parent)
            os.replace(folder, os.path.join(old, "model"))
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def stage_pretrain(run):
    """Stage 1: the teacher LM, trained on text only."""
    cfg, rt = run.cfg, run.rt
    model = Decoder(lm_config(cfg, run.tok)).to(rt.device)
    train_stage(run, "pretrain", rt.wrap(model),
                [{"params": list(model.parameters()), "lr": cfg.pretrain_lr}], cfg.pretrain_steps)
    if rt.is_main:
        save_model_folder(run, os.path.join(cfg.out_dir, "teacher"), lambda d: save_hf_lm(model, d))
    return model


def initial_student(cfg, teacher, tok):
    """The VLM that stage 2 starts from: --student_path (nanoVLM or ours), or the teacher's
    decoder (vocabulary grown for <image> and, with --image_splitting, the grid tokens) + a
    vision tower (--vision_path or fresh) + a fresh projector."""
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    view_ids = [tok.token_to_id(t) for t in data.VIEW_TOKENS] if cfg.image_splitting else []
    if cfg.student_path:
        vlm = load_model_folder(cfg.student_path, image_token_id=image_id)
        check_student_tokens(vlm, tok, cfg.student_path)
        return vlm
    vision = load_hf_siglip(cfg.vision_path) if cfg.vision_path else None
    splitting = ImageSplitting(max_side=cfg.image_max_side) if cfg.image_splitting else None
    vlm = vlm_from_teacher(grow_vocab(teacher, tok.get_vocab_size()),
                           vision.cfg if vision else vision_config(cfg), image_id,
                           cfg.shuffle_factor, view_ids, splitting)
    if vision:
        vlm.vision.load_state_dict(vision.state_dict())
    return vlm


def check_student_tokens(vlm, tok, folder):
    """A given student must read the run's tokenizer: a VLM, its <image> (and grid) ids those of
    the tokenizer, a vocabulary that covers it, and, if the folder has its own tokenizer, the
    same token for every shared id (kvshare.check_shared_vocab)."""
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    if getattr(vlm, "image_token_id", None) != image_id:
        raise ValueError(f"{folder}: not a VLM with the tokenizer's {data.IMAGE_TOKEN} id "
                         f"{image_id}")
    if vlm.decoder.cfg.vocab_size < tok.get_vocab_size():
        raise ValueError(f"{folder}: the student's vocabulary ({vlm.decoder.cfg.vocab_size}) is "
                         f"smaller than the tokenizer's ({tok.get_vocab_size()})")
    view_ids = [tok.token_to_id(t) for t in data.VIEW_TOKENS]
    if vlm.view_token_ids and list(vlm.view_token_ids) != view_ids:
        raise ValueError(f"{folder}: the student's image-splitting token ids differ from the "
                         "tokenizer's (load it with --image_splitting=true)")
    own = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(own):
        kvshare.check_shared_vocab(tok, data.load_tokenizer(own))


def stage_adapt(run, teacher):
    """Stage 2: teacher copy + vision tower + projector. Align (decoder frozen), then full
    fine-tune with CE on vision-heavy data: the language ability erodes."""
    cfg, rt = run.cfg, run.rt
    vlm = initial_student(cfg, teacher, run.tok).to(rt.device)
    vlm.decoder.gradient_checkpointing = cfg.grad_checkpointing
    vision_params = list(vlm.vision.parameters()) + list(vlm.projector.parameters())
    vlm.decoder.requires_grad_(False)
    if cfg.align_steps:
        train_stage(run, "align", rt.wrap(vlm), [{"params": vision_params, "lr": cfg.align_lr}],
                    cfg.align_steps)
    vlm.decoder.requires_grad_(True)
    train_stage(run, "adapt", rt.wrap(vlm),
                [{"params": list(vlm.decoder.parameters()), "lr": cfg.adapt_lr},
                 {"params": vision_params, "lr": cfg.adapt_vision_lr}], cfg.adapt_steps)
    if rt.is_main:
        save_model_folder(run, os.path.join(cfg.out_dir, "adapted"), lambda d: save_vlm(vlm, d))
    return vlm


def stage_distill(run, teacher, student):
    """Stage 3: CE + source-selective KD from the frozen teacher through the KV handoff. On
    CUDA the teacher is held in bf16 (cast once; no per-step weight casts under autocast)."""
    cfg, rt = run.cfg, run.rt
    kvshare.check_compatible(teacher.cfg, student.decoder.cfg)
    run.teacher = kvshare.freeze(teacher.to(rt.device), torch.bfloat16 if rt.cuda else None)
    run.kd_table = distill.table_from_kinds(run.world.source_kinds)
    student.to(rt.device).requires_grad_(True)
    student.decoder.gradient_checkpointing = cfg.grad_checkpointing
    train_stage(run, "distill", rt.wrap(student),
                [{"params": list(student.parameters()), "lr": cfg.distill_lr}],
                cfg.distill_steps, name=f"distill-{variant_name(cfg)}")
    if rt.is_main:
        save_model_folder(run, os.path.join(cfg.out_dir, f"distilled-{variant_name(cfg)}"),
                          lambda d: save_vlm(student, d))
    return student


def build_world_and_tokenizer(cfg):
    """The data (the tiny world, or --data_path) and the tokenizer (trained on the tiny
    world's corpus, or the teacher's own)."""
    if cfg.data_path:
        world = data.RealData(cfg.data_path.split(","), cfg.image_size, cfg.max_len or None,
                              cfg.image_root or None, cfg.skip_bad,
                              [s for s in cfg.kd_sources.split(",") if s])
    else:
        world = data.build_world(cfg.seed, n_entities=cfg.n_entities, image_size=cfg.image_size)
    if cfg.teacher_path:
        tok = data.load_tokenizer(os.path.join(cfg.teacher_path, "tokenizer.json"),
                                  image_splitting=cfg.image_splitting)
    else:
        tok = data.train_tokenizer(world.corpus, cfg.vocab_size)
    return world, tok


def stages_to_train(cfg):
    """The checkpoint folder names of the stages this run trains."""
    names = []
    if cfg.stage in ("pretrain", "all") and not cfg.teacher_path:
        names.append("pretrain")
    if cfg.stage in ("adapt", "all"):
        names += ["align", "adapt"]
    if cfg.stage in ("distill", "all"):
        names.append(f"distill-{variant_name(cfg)}")
    return names


def check_out_dir(cfg):
    """A fresh run (no --resume) must not start in a folder holding another run's checkpoints
    of the same stage: it would mix two runs' checkpoints (and keep_last would delete one)."""
    for name in stages_to_train(cfg):
        found = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last).paths()
        if found and not cfg.resume:
            raise ValueError(f"--out_dir={cfg.out_dir} already holds checkpoints of stage {name} "
                             f"({os.path.basename(found[-1])}, ...): pass --resume=true to "
                             "continue that run, or choose another --out_dir")


def run(cfg):
    """Run the configured stages. Returns (models, world, tok): models maps "teacher",
    "adapted" and "distilled-<variant>" to what the stages trained or loaded."""
    check_out_dir(cfg)
    rt = Runtime(cfg)
    seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    world, tok = build_world_and_tokenizer(cfg)
    state = Run(cfg, rt, world, tok)
    if "pretrain" in stages_to_train(cfg):
        state.text_stream = data.encode_corpus(world.corpus, tok)            # (N,)
        if len(state.text_stream) < cfg.seq_len + 2:
            raise ValueError(f"--seq_len={cfg.seq_len} is longer than the whole text corpus "
                             f"({len(state.text_stream)} tokens)")
    t0 = time.time()
    models = {}
    teacher_dir = os.path.join(cfg.out_dir, "teacher")
    adapted_dir = os.path.join(cfg.out_dir, "adapted")
    if cfg.teacher_path:
        models["teacher"] = load_hf_lm(cfg.teacher_path).to(rt.device)
    elif cfg.stage in ("pretrain", "all"):
        models["teacher"] = stage_pretrain(state)
    else:
        models["teacher"] = load_hf_lm(teacher_dir).to(rt.device)
    if cfg.stage in ("adapt", "all"):
        models["adapted"] = stage_adapt(state, models["teacher"])
    elif cfg.stage == "distill":
        # from the adapted model of an earlier run, else (real checkpoints) the initial student
        if os.path.isdir(adapted_dir) or not cfg.teacher_path:
            start = load_model_folder(adapted_dir)
            check_student_tokens(start, tok, adapted_dir)
        else:
            start = initial_student(cfg, models["teacher"], tok)
        models["adapted"] = start.to(rt.device)
    if cfg.stage in ("distill", "all"):
        student = copy.deepcopy(models["adapted"]) if cfg.stage == "all" else models.pop("adapted")
        models[f"distilled-{variant_name(cfg)}"] = stage_distill(state, models["teacher"], student)
    if rt.ddp:
        dist.barrier()                  # every rank waits for rank 0's saves before going on
    if rt.is_main:
        print(f"stages {cfg.stage} done in {time.time() - t0:.1f}s on {rt.device}; "
              f"models in {cfg.out_dir}/")
    return models, world, tok


def main(argv):
    """Bad input (config, files, checkpoints) and a stage that cannot go on end with one line
    on stderr and exit status 1, not a traceback; anything unexpected keeps its traceback."""
    try:
        cfg = get_config(argv)
        models, world, tok = run(cfg)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        sys.exit(f"train.py: {e}")
    if cfg.eval and int(os.environ.get("RANK", "0")) == 0 and world.language_bench:
        rows = evaluation.evaluate_models(models, world, tok, cfg.image_size)
        print(evaluation.format_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
