"""
LinguDistill in three stages, nanoGPT-style: one config dataclass, overridable from the
command line (`--key=value`) or a JSON config file.

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
import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import data
import distill
import kvshare
from model import LMConfig, VisionConfig, Decoder, grow_vocab, vlm_from_teacher
from weights import atomic_write, save_hf_lm, load_hf_lm, save_vlm, load_vlm


@dataclass
class TrainConfig:
    # run
    preset: str = "tiny"          # smoke | tiny | paper: a named set of the defaults below
    stage: str = "all"            # pretrain | adapt | distill | all
    out_dir: str = "out"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    compile: bool = False         # torch.compile the trained model (checkpoints stay loadable without it)
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
    # real checkpoints (README "Run on real weights"); empty = the tiny world trained from scratch
    teacher_path: str = ""        # HF Llama/SmolLM2 folder: the frozen teacher (stage 1 is skipped)
    student_path: str = ""        # nanoVLM or our VLM folder to start from (else teacher copy + vision tower)
    vision_path: str = ""         # HF SigLIP folder for a fresh student's vision tower (else random init)
    data_path: str = ""           # LLaVA-style JSONL for stages 2-3 (else the tiny world's sources)
    image_root: str = ""          # folder image paths in data_path are relative to (default: its folder)
    kd_sources: str = ""          # comma list of data_path sources that are language-intensive (get KD)
    skip_bad: bool = False        # skip (and count) bad lines of data_path instead of stopping
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
    "smoke": dict(n_entities=8, vocab_size=300, lm_dim=32, lm_layers=2, lm_heads=2, lm_kv_heads=1, lm_ffn=64,
                  vision_dim=32, vision_layers=1, vision_heads=2, pretrain_steps=6, align_steps=3, adapt_steps=3,
                  distill_steps=3, batch_size=4, seq_len=32, log_every=1, ckpt_every=2),
}
# The paper's student (nanoVLM-460M): SigLIP2-B/16-512 + pixel shuffle 4 + SmolLM2-360M (from --teacher_path).
PRESETS["paper"] = dict(image_size=512, patch_size=16, vision_dim=768, vision_layers=12, vision_heads=12,
                        shuffle_factor=4, batch_size=8, grad_accum=4, align_steps=1000, align_lr=1e-3,
                        adapt_steps=4000, adapt_lr=1e-4, adapt_vision_lr=1e-4, distill_steps=1000,
                        distill_lr=5e-5, ckpt_every=500)
STAGES = ("pretrain", "adapt", "distill", "all")


# ----------------------------------------------------------------------------------------
# Config: preset < config file < --key=value

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
        overrides[key] = parse_value(known[key], val)
    from_files = {}
    for path in files:
        try:
            d = json.load(open(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"config file {path}: {e}") from None
        bad = sorted(set(d) - set(known))
        if bad:
            raise ValueError(f"config file {path}: unknown key(s) {bad}")
        from_files.update(d)
    preset = overrides.get("preset", from_files.get("preset", "tiny"))
    if preset not in PRESETS:
        raise ValueError(f"--preset={preset!r}; expected one of {sorted(PRESETS)}")
    cfg = replace(TrainConfig(), **{**PRESETS[preset], **from_files, **overrides, "preset": preset})
    check_config(cfg)
    return cfg


def check_config(cfg):
    choices = {"stage": STAGES, "policy": distill.POLICIES, "scope": kvshare.SCOPES,
               "kd": distill.DIVERGENCES, "device": ("auto", "cpu", "cuda")}
    for key, ok in choices.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}; expected one of {list(ok)}")
    for key in ("batch_size", "grad_accum", "seq_len", "log_every", "ckpt_every", "keep_last"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.preset == "paper" and not cfg.teacher_path:
        raise ValueError("--preset=paper needs --teacher_path=FOLDER (a SmolLM2-360M-Instruct HF folder)")
    if cfg.data_path and not cfg.teacher_path:
        raise ValueError("--data_path needs --teacher_path: stage 1 trains a teacher only on the tiny world's text")
    if cfg.teacher_path and cfg.stage == "pretrain":
        raise ValueError("--stage=pretrain trains a teacher; with --teacher_path the teacher is given")
    for key in ("teacher_path", "student_path", "vision_path", "data_path", "image_root"):
        path = getattr(cfg, key)
        if path and not os.path.exists(path):
            raise ValueError(f"--{key}={path}: no such file or folder")


# ----------------------------------------------------------------------------------------
# Runtime: device, precision, seeds

class Runtime:
    """Device, precision and (under torchrun) the DDP process group."""

    def __init__(self, cfg):
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda but no CUDA device is available")
        self.cuda = cuda
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank, self.world_size = 0, 1
        if self.ddp:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.is_main = self.rank == 0
        # bf16 autocast on CUDA, plain fp32 on CPU
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    def to(self, batch):
        """Move a batch to the device (pinned host memory + async copy on CUDA)."""
        def move(v):
            if not torch.is_tensor(v):
                return v
            return v.pin_memory().to(self.device, non_blocking=True) if self.cuda else v
        return {k: move(v) for k, v in batch.items()}

    def wrap(self, model):
        if not self.ddp:
            return model
        from torch.nn.parallel import DistributedDataParallel
        # text-only batches leave the vision tower without gradients: let DDP allow that
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None,
                                       find_unused_parameters=True)

    def no_sync(self, model, skip_sync):
        """Gradient accumulation under DDP: all-reduce gradients only on the last micro-batch."""
        return model.no_sync() if self.ddp and skip_sync else nullcontext()

    def all_reduce_logs(self, logs):
        if not self.ddp:
            return logs
        import torch.distributed as dist
        t = torch.tensor(list(logs.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(logs, t.tolist()))

    def all_reduce_counts(self, counts):
        """Token counts summed over micro-batches and ranks: the global loss normalisers."""
        total = torch.tensor([[c["ce"], c["kd"]] for c in counts], dtype=torch.float64).sum(0)
        if self.ddp:
            import torch.distributed as dist
            total = total.to(self.device)
            dist.all_reduce(total)
        return {"ce": float(total[0]), "kd": float(total[1])}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    state = {"python": repr(random.getstate()), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": np_state[2], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import ast
    random.setstate(ast.literal_eval(state["python"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# Checkpoints: {model, optimizer, scheduler, step, config, rng, bad_steps}, written atomically

# Keys that may differ between a checkpoint and the run resuming it.
RUN_KEYS = {"stage", "resume", "eval", "device", "compile", "log_every", "ckpt_every", "keep_last", "max_bad_steps",
            "pretrain_steps", "align_steps", "adapt_steps", "distill_steps"}


class Checkpoints:
    def __init__(self, folder, keep_last):
        self.folder, self.keep_last = folder, keep_last

    def paths(self):
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, f) for f in os.listdir(self.folder)
                      if f.startswith("step_") and f.endswith(".pt"))

    def save(self, step, state):
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(os.path.join(self.folder, f"step_{step:07d}.pt"), lambda tmp: torch.save(state, tmp))
        for old in self.paths()[:-self.keep_last]:
            os.remove(old)

    def load(self, path, cfg):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
        ours = asdict(cfg)
        diffs = [f"{k}: checkpoint {v!r} vs run {ours.get(k)!r}" for k, v in state.get("config", {}).items()
                 if k not in RUN_KEYS and ours.get(k) != v]
        if diffs:
            raise ValueError(f"checkpoint {path} comes from another config:\n  " + "\n  ".join(diffs))
        return state


def unwrap(model):
    """The plain module under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


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
# The training loop shared by every stage

def train_loop(name, model, groups, make_batch, loss_fn, count_fn, steps, cfg, rt):
    """Train `model` for `steps` optimizer steps.

    make_batch(step, micro) -> batch; deterministic in (seed, step, micro), so the data
        position is just the step and a resumed run sees exactly the same batches.
    count_fn(batch) -> {"ce": n, "kd": n}: token counts. Losses are normalised by the totals
        over all grad_accum micro-batches (and all DDP ranks), once.
    loss_fn(model, batch, norms) -> {"loss": tensor, **scalars to log}.
    """
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=rt.cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.warmup_frac))
    ckpts = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last)
    start, bad = 0, 0
    if cfg.resume and ckpts.paths():
        state = ckpts.load(ckpts.paths()[-1], cfg)
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, bad = state["step"], state["bad_steps"]
        set_rng_state(state["rng"])
    fwd = torch.compile(model) if cfg.compile else model
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=not rt.is_main, leave=False)
    history, t_start = [], time.time()
    for step in bar:
        batches = [rt.to(make_batch(step, micro)) for micro in range(cfg.grad_accum)]
        norms = rt.all_reduce_counts([count_fn(b) for b in batches])
        logs = {}
        for micro, batch in enumerate(batches):
            with rt.no_sync(fwd, micro < len(batches) - 1), rt.autocast():
                out = loss_fn(fwd, batch, norms)
                (out["loss"] * rt.world_size).backward()     # DDP averages grads over ranks
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        logs["tokens"] = float(sum(b["attention_mask"].sum() if "attention_mask" in b else b["tokens"][:, 1:].numel()
                                   for b in batches))
        logs = rt.all_reduce_logs(logs)                       # each rank's loss is its share of the global mean
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not (math.isfinite(logs["loss"]) and torch.isfinite(grad_norm)):
            bad += 1
            opt.zero_grad(set_to_none=True)
            if bad > cfg.max_bad_steps:
                raise RuntimeError(f"{name}: {bad} steps with non-finite loss or gradients (limit --max_bad_steps="
                                   f"{cfg.max_bad_steps}); last good checkpoint kept in {ckpts.folder}")
            continue
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record = {"stage": name, "step": step + 1, "time": round(time.time() - t_start, 4),
                  "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "bad_steps": bad, **logs}
        if rt.cuda:
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        history.append(record)
        if rt.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.log_every == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k != "tokens"})
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == steps:
                ckpts.save(step + 1, {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                                      "scheduler": sched.state_dict(), "step": step + 1, "bad_steps": bad,
                                      "config": asdict(cfg), "rng": rng_state()})
    return history


# ----------------------------------------------------------------------------------------
# Data: batches are a pure function of (seed, stage, step, micro-batch)

def batch_rng(cfg, stage, step, micro):
    return np.random.default_rng([cfg.seed, STAGE_IDS[stage], step, micro])


STAGE_IDS = {"pretrain": 1, "align": 2, "adapt": 3, "distill": 4}


def rank_slice(items, rt):
    """This rank's share of a global batch (the whole batch without DDP)."""
    n = len(items) // rt.world_size
    return items[rt.rank * n:(rt.rank + 1) * n]


def text_batch_fn(cfg, rt, stream):
    """Random windows of seq_len+1 tokens from the encoded corpus."""
    def make(step, micro):
        rng = batch_rng(cfg, "pretrain", step, micro)
        starts = rng.integers(0, len(stream) - cfg.seq_len - 1, size=cfg.batch_size * rt.world_size)
        starts = rank_slice(starts, rt)
        return {"tokens": torch.stack([stream[s:s + cfg.seq_len + 1] for s in starts])}
    return make


def mix_batch_fn(cfg, rt, world, tok, n_image_tokens, stage, mixture):
    """Image-text batches: each example's source drawn by `mixture` weights (source -> weight)."""
    names = sorted(mixture)
    probs = np.array([mixture[s] for s in names], dtype=np.float64)
    probs /= probs.sum()
    def make(step, micro):
        rng = batch_rng(cfg, stage, step, micro)
        picks = [(names[i], rng.random()) for i in rng.choice(len(names), size=cfg.batch_size * rt.world_size, p=probs)]
        examples = [world.sources[s][int(u * len(world.sources[s]))] for s, u in rank_slice(picks, rt)]
        return data.collate(examples, tok, n_image_tokens, cfg.image_size)
    return make


def ce_loss(model, batch, norms):
    logits, _ = kvshare.student_prefill(model, batch)
    out = distill.distill_loss(logits, batch["labels"], batch["response_mask"], policy="none",
                               ce_normalizer=norms["ce"])
    return {"loss": out["loss"], "ce": out["ce"]}


def response_counts(batch, weights=None):
    m = batch["response_mask"].float()
    kd = 0.0 if weights is None else float((m * weights(batch["source"]).to(m.device)[:, None]).sum())
    return {"ce": float(m.sum()), "kd": kd}


# ----------------------------------------------------------------------------------------
# The three stages

def lm_config(cfg, tok):
    return LMConfig(vocab_size=tok.get_vocab_size(), dim=cfg.lm_dim, n_layers=cfg.lm_layers, n_heads=cfg.lm_heads,
                    n_kv_heads=cfg.lm_kv_heads, ffn_dim=cfg.lm_ffn, max_positions=4 * cfg.seq_len + 256)


def vision_config(cfg):
    return VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, dim=cfg.vision_dim,
                        n_layers=cfg.vision_layers, n_heads=cfg.vision_heads, mlp_dim=4 * cfg.vision_dim)


def stage_pretrain(cfg, rt, world, tok):
    """Stage 1: the teacher LM, trained on text only."""
    stream = data.encode_corpus(world.corpus, tok)
    model = Decoder(lm_config(cfg, tok)).to(rt.device)
    def loss_fn(m, b, norms):
        x, y = b["tokens"][:, :-1], b["tokens"][:, 1:]
        logits, _ = m(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        return {"loss": loss / norms["ce"], "ce": loss.detach() / norms["ce"]}
    count = lambda b: {"ce": b["tokens"][:, 1:].numel(), "kd": 0}
    train_loop("pretrain", rt.wrap(model), [{"params": list(model.parameters()), "lr": cfg.pretrain_lr}],
               text_batch_fn(cfg, rt, stream), loss_fn, count, cfg.pretrain_steps, cfg, rt)
    if rt.is_main:
        save_run(cfg, tok, os.path.join(cfg.out_dir, "teacher"), lambda d: save_hf_lm(model, d))
    return model


def stage_adapt(cfg, rt, world, tok, teacher):
    """Stage 2: teacher copy + vision tower + projector. Align (decoder frozen), then full
    fine-tune with CE on vision-heavy data: the language ability erodes."""
    vlm = initial_student(cfg, teacher, tok).to(rt.device)
    vision_params = list(vlm.vision.parameters()) + list(vlm.projector.parameters())
    align_mix, adapt_mix, _ = mixtures(world)
    vlm.decoder.requires_grad_(False)
    train_loop("align", rt.wrap(vlm), [{"params": vision_params, "lr": cfg.align_lr}],
               mix_batch_fn(cfg, rt, world, tok, vlm.n_image_tokens, "align", align_mix), ce_loss, response_counts,
               cfg.align_steps, cfg, rt)
    vlm.decoder.requires_grad_(True)
    train_loop("adapt", rt.wrap(vlm), [{"params": list(vlm.decoder.parameters()), "lr": cfg.adapt_lr},
                                       {"params": vision_params, "lr": cfg.adapt_vision_lr}],
               mix_batch_fn(cfg, rt, world, tok, vlm.n_image_tokens, "adapt", adapt_mix), ce_loss, response_counts,
               cfg.adapt_steps, cfg, rt)
    if rt.is_main:
        save_run(cfg, tok, os.path.join(cfg.out_dir, "adapted"), lambda d: save_vlm(vlm, d))
    return vlm


def variant_name(cfg):
    return cfg.variant or f"{cfg.policy}-{cfg.scope}"


def stage_distill(cfg, rt, world, tok, teacher, student):
    """Stage 3: CE + source-selective KD from the frozen teacher through the KV handoff."""
    kvshare.check_compatible(teacher.cfg, student.decoder.cfg)
    teacher = kvshare.freeze(teacher.to(rt.device))
    student.to(rt.device).requires_grad_(True)
    table = distill.table_from_kinds(world.source_kinds)
    weights = lambda sources: distill.source_weights(cfg.policy, sources, table)
    def loss_fn(m, b, norms):
        s_logits, t_logits = kvshare.distill_forward(m, teacher, b, student.image_token_id, cfg.scope,
                                                     need_teacher=cfg.policy != "none")
        out = distill.distill_loss(s_logits, b["labels"], b["response_mask"], t_logits, b["source"], cfg.policy,
                                   table, cfg.alpha, cfg.kd, cfg.temperature, cfg.jsd_beta, cfg.kd_chunk or None,
                                   ce_normalizer=norms["ce"], kd_normalizer=norms["kd"])
        return {"loss": out["loss"], "ce": out["ce"], "kd": out["kd"]}
    train_loop(f"distill-{variant_name(cfg)}", rt.wrap(student), [{"params": list(student.parameters()),
                                                                    "lr": cfg.distill_lr}],
               mix_batch_fn(cfg, rt, world, tok, student.n_image_tokens, "distill", mixtures(world)[2]), loss_fn,
               lambda b: response_counts(b, weights), cfg.distill_steps, cfg, rt)
    if rt.is_main:
        save_run(cfg, tok, os.path.join(cfg.out_dir, f"distilled-{variant_name(cfg)}"), lambda d: save_vlm(student, d))
    return student


def save_run(cfg, tok, folder, save_model):
    """A model folder: weights + config (HF layout or ours) + tokenizer.json + train_config.json."""
    save_model(folder)
    data.save_tokenizer(tok, folder)
    atomic_write(os.path.join(folder, "train_config.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(asdict(cfg), indent=2)))


def mixtures(world):
    """Source weights per stage. align: every image source (decoder frozen, so image tokens
    land where the teacher reads names and descriptions); adapt: vision-heavy only (language
    erodes); distill: every source (vision CE keeps vision, language sources carry the KD)."""
    image_sources = [s for s, ex in world.sources.items() if any(e["image"] is not None for e in ex)]
    vision = [s for s in world.sources if world.source_kinds[s] == "vision"] or image_sources
    return ({s: 1.0 for s in image_sources}, {s: 1.0 for s in vision}, {s: 1.0 for s in world.sources})


class JsonlWorld:
    """Real data in place of the tiny world: sources grouped by each line's "source";
    the ones named in --kd_sources are language-intensive. No built-in benchmarks."""
    def __init__(self, cfg):
        examples = data.load_jsonl(cfg.data_path, image_root=cfg.image_root or None, skip_bad=cfg.skip_bad)
        if not examples:
            raise ValueError(f"--data_path={cfg.data_path}: no examples")
        self.sources = {}
        for ex in examples:
            self.sources.setdefault(ex["source"], []).append(ex)
        kd = {s for s in cfg.kd_sources.split(",") if s}
        unknown = sorted(kd - set(self.sources))
        if unknown:
            raise ValueError(f"--kd_sources {unknown} not found in {cfg.data_path} (sources: {sorted(self.sources)})")
        self.source_kinds = {s: "language" if s in kd else "vision" for s in self.sources}
        self.corpus, self.language_bench, self.vision_bench, self.knowledge_bench = [], [], [], []


def build_world_and_tokenizer(cfg):
    world = JsonlWorld(cfg) if cfg.data_path else data.build_world(cfg.seed, n_entities=cfg.n_entities,
                                                                   image_size=cfg.image_size)
    if cfg.teacher_path:
        tok = data.load_tokenizer(os.path.join(cfg.teacher_path, "tokenizer.json"))
    else:
        tok = data.train_tokenizer(world.corpus, cfg.vocab_size)
    return world, tok


def initial_student(cfg, teacher, tok):
    """The VLM that stage 2 starts from: --student_path (nanoVLM or ours), or the teacher's
    decoder (vocabulary grown for <image>) + a vision tower (--vision_path or fresh) + a
    fresh projector."""
    from weights import read_json, load_nanovlm, load_hf_siglip
    image_id = tok.token_to_id(data.IMAGE_TOKEN)
    if cfg.student_path:
        c = read_json(os.path.join(cfg.student_path, "config.json"))
        vlm = load_vlm(cfg.student_path) if c.get("model_type") == "lingudistill_vlm" else \
            load_nanovlm(cfg.student_path, image_token_id=image_id)
        if vlm.image_token_id != image_id:
            raise ValueError(f"{cfg.student_path}: image token id {vlm.image_token_id} but the tokenizer's "
                             f"{data.IMAGE_TOKEN} is {image_id}")
        return vlm
    vision = load_hf_siglip(cfg.vision_path) if cfg.vision_path else None
    vlm = vlm_from_teacher(grow_vocab(teacher, tok.get_vocab_size()), vision.cfg if vision else vision_config(cfg),
                           image_id, cfg.shuffle_factor)
    if vision:
        vlm.vision.load_state_dict(vision.state_dict())
    return vlm


def run(cfg):
    """Run the configured stages; returns {name: model} of what it trained or loaded."""
    rt = Runtime(cfg)
    seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    world, tok = build_world_and_tokenizer(cfg)
    t0 = time.time()
    models = {}
    teacher_dir, adapted_dir = os.path.join(cfg.out_dir, "teacher"), os.path.join(cfg.out_dir, "adapted")
    if cfg.teacher_path:
        models["teacher"] = load_hf_lm(cfg.teacher_path).to(rt.device)
    elif cfg.stage in ("pretrain", "all"):
        models["teacher"] = stage_pretrain(cfg, rt, world, tok)
    else:
        models["teacher"] = load_hf_lm(teacher_dir).to(rt.device)
    if cfg.stage in ("adapt", "all"):
        models["adapted"] = stage_adapt(cfg, rt, world, tok, models["teacher"])
    elif cfg.stage == "distill":
        # distill from the adapted model of an earlier run, else (real checkpoints) the initial student
        start = load_vlm(adapted_dir) if os.path.isdir(adapted_dir) or not cfg.teacher_path else \
            initial_student(cfg, models["teacher"], tok)
        models["adapted"] = start.to(rt.device)
    if cfg.stage in ("distill", "all"):
        student = copy.deepcopy(models["adapted"]) if cfg.stage == "all" else models.pop("adapted")
        models[f"distilled-{variant_name(cfg)}"] = stage_distill(cfg, rt, world, tok, models["teacher"], student)
    if rt.ddp:
        torch.distributed.barrier()           # every rank waits for rank 0's saves before going on
    if rt.is_main:
        print(f"stages {cfg.stage} done in {time.time() - t0:.1f}s on {rt.device}; models in {cfg.out_dir}/")
    return models, world, tok


def main(argv):
    """Bad input (config, files, checkpoints) ends with its one-line message, not a traceback."""
    try:
        cfg = get_config(argv)
        models, world, tok = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: {e}")
    if cfg.eval and int(os.environ.get("RANK", "0")) == 0 and world.language_bench:
        import eval as evaluation
        rows = evaluation.evaluate_models(models, world, tok, cfg.image_size)
        print(evaluation.format_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
