"""
Run-time plumbing for train.py and the tools, kept out of the method's reading path: atomic file
writes (and new output folders), the out_dir lock (one run per folder), a dataclass config read
from --key=value flags and JSON files (with --help), the device / DDP runtime, RNG state,
checkpoints, log.jsonl, interrupts, and StageRun: everything around one stage's training loop
(optimizer, schedule, resume, bad steps, logging). Imports no module of this repository.
"""
import ast
import difflib
import fcntl
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


# ----------------------------------------------------------------------------------------
# Files: every write is atomic (temp file + fsync + rename), with normal permissions

def current_umask():
    mask = os.umask(0o022)      # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path, write_fn):
    """Write via a temp file in the same folder, fsync, rename over `path`, then fsync the
    folder (so the rename itself survives a crash): a crash never leaves a half-written file
    under the final name. The file gets mode 0644 minus the umask, like a plain open() would
    give (tempfile creates 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path, text):
    """atomic_write of a UTF-8 text file (closed before the fsync)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def replace_folder(folder, fill):
    """Write a whole folder atomically: fill(tmp) writes into a temp folder beside `folder`,
    which is then renamed into place, so `folder` is always complete (an older one at that path
    is replaced only once the new one is whole)."""
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(folder)}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        fill(tmp)
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


def check_new_folder(folder, what="the output folder"):
    """Before a tool writes `folder`: it must be new or empty (a used folder would keep files of
    an earlier export beside the new ones), and not a file."""
    if os.path.isfile(folder):
        raise ValueError(f"{what} {folder} is a file; expected a new or empty folder")
    if os.path.isdir(folder) and os.listdir(folder):
        found = sorted(os.listdir(folder))
        raise ValueError(f"{what} {folder} already holds files ({', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}); expected a new or empty folder "
                         "(remove it or choose another)")


# ----------------------------------------------------------------------------------------
# One run per folder: a lock file held (flock) for the run's lifetime

LOCK_FILE = "train.lock"


class FolderLock:
    """`with FolderLock(folder):` -- this process alone uses `folder`. The lock is an flock on
    folder/train.lock, which holds the owner's pid: the kernel releases it when the process
    ends, however it ends, so a lock file left by a killed run is stale and taken over (said
    on stderr). A second run on the folder gets a ValueError naming the folder and the process.
    The folder is created if needed, and removed again at the end if the run left it empty.
    enabled=False (a DDP rank other than 0): nothing is locked."""

    def __init__(self, folder, enabled=True, who="train.py"):
        self.folder, self.enabled, self.who = folder, enabled, who
        self.path, self.fd, self.created = os.path.join(folder, LOCK_FILE), None, False

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            self.created = not os.path.isdir(self.folder)
            os.makedirs(self.folder, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise ValueError(f"--out_dir={self.folder} is in use by another run "
                                     f"({self._holder()}, lock {self.path}); wait for it to "
                                     "end or choose another --out_dir") from None
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd        # else the owner removed the file as we opened it: again
                else:
                    os.close(fd)
        except OSError as e:
            raise ValueError(f"--out_dir={self.folder}: cannot create the folder or its lock file "
                             f"({e.strerror}: {e.filename}); expected a writable folder") from None
        stale = os.read(self.fd, 64).decode(errors="replace").strip()
        if stale:
            print(f"{self.who}: --out_dir={self.folder}: taking over the stale lock of process "
                  f"{stale} (it ended without releasing it)", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def _holder(self):
        try:
            with open(self.path) as f:
                pid = f.read().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid else "a process that is starting"

    def __exit__(self, *exc):
        if self.fd is None:
            return
        with suppress(OSError):
            os.remove(self.path)              # while still locked: no one else can hold it
        os.close(self.fd)
        self.fd = None
        if self.created:
            with suppress(OSError):
                os.rmdir(self.folder)         # only if the run wrote nothing in it


# ----------------------------------------------------------------------------------------
# A dataclass config from the command line: defaults < preset < JSON files < --key=value

def field_docs(cls):
    """{field: its trailing comment} and the section comments, read from the class's source:
    the dataclass's own comments are its --help (one source of truth)."""
    docs, sections, section = {}, {}, ""
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [\w\[\], ]+ = .*?(?:#\s*(.*))?$", line)
        if m:
            docs[m.group(1)], sections[m.group(1)] = (m.group(2) or "").strip(), section
        elif re.match(r"\s+# ", line):
            section = line.strip()[2:]
    return docs, sections


def flag_line(flag, doc):
    """One --help line: the flag with its default, then what it does (on the next line when the
    flag is long)."""
    return f"{flag:<34} {doc}" if len(flag) < 34 else f"{flag}\n{'':34} {doc}"


def config_help(cls, presets, usage):
    docs, sections = field_docs(cls)
    lines, section = [usage, "", f"presets: {', '.join(presets)} (--preset=NAME sets the "
                              "defaults below; JSON files, then flags, override them)"], None
    for f in fields(cls):
        if sections[f.name] != section:
            section = sections[f.name]
            lines += ["", f"{section}:"]
        value = (str(f.default).lower() if isinstance(f.default, bool)
                 else f.default if f.default != "" else '""')
        lines.append(flag_line(f"  --{f.name}={value}", docs[f.name]))
    return "\n".join(lines)


def _type(f):
    return {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)


def parse_value(f, text):
    if _type(f) is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{f.name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return _type(f)(text)
    except ValueError:
        raise ValueError(f"--{f.name}: expected {_type(f).__name__}, got {text!r}") from None


def check_json_value(f, value, path):
    """A value from a JSON config file must already have the field's type (no "false" strings)."""
    typ = _type(f)
    if not (type(value) is typ or (typ is float and type(value) is int)):
        raise ValueError(
            f"config file {path}: {f.name!r} is {json.dumps(value)}, expected a JSON "
            f"{ {int: 'integer', float: 'number', str: 'string', bool: 'true/false'}[typ] }")
    return float(value) if typ is float else value


def closest(key, known):
    """The known key most like `key`, or None."""
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def unknown_key(key, known, where):
    close = closest(key, known)
    hint = f"did you mean --{close}?" if close else "see --help for every key"
    return ValueError(f"{where}unknown config key --{key}; {hint}")


def read_config_file(path, known):
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
        close = closest(bad[0], known)
        raise ValueError(f"config file {path}: unknown key(s) {bad}"
                         + (f"; did you mean {close!r}?" if close else ""))
    return {k: check_json_value(known[k], v, path) for k, v in d.items()}


def parse_flags(argv, cls):
    """--key=value flags and JSON config file paths -> ({key: value}, [file paths])."""
    known = {f.name: f for f in fields(cls)}
    overrides, files = {}, []
    for arg in argv:
        if not arg.startswith("--"):
            files.append(arg)
            continue
        key, eq, val = arg[2:].partition("=")
        if key not in known:
            raise unknown_key(key, known, "")
        if not eq:
            raise ValueError(f"--{key}: expected --{key}=value")
        if key in overrides:
            raise ValueError(f"--{key} given twice; give each flag once")
        overrides[key] = parse_value(known[key], val)
    return overrides, files


def build_config(cls, presets, overrides, files, base=None):
    """The config: base (default: the dataclass defaults + the preset) < files < overrides."""
    known = {f.name: f for f in fields(cls)}
    from_files = {}
    for path in files:
        from_files.update(read_config_file(path, known))
    if base is not None:
        return replace(base, **{**from_files, **overrides})
    preset = overrides.get("preset", from_files.get("preset", "tiny"))
    if preset not in presets:
        raise ValueError(f"--preset={preset!r}; expected one of {sorted(presets)}")
    return replace(cls(), **{**presets[preset], **from_files, **overrides, "preset": preset})


def wants_help(argv):
    return any(a in ("-h", "--help") for a in argv)


# ----------------------------------------------------------------------------------------
# Device, precision and DDP

class Runtime:
    """Device, precision and (under torchrun) the DDP process group."""

    def __init__(self, device="auto"):
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda but no CUDA device is available")
        self.cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
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
        if not self.cuda:
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

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

    def barrier(self):
        if self.ddp:
            dist.barrier()


# ----------------------------------------------------------------------------------------
# RNG state

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


# ----------------------------------------------------------------------------------------
# Checkpoints: {model, optimizer, scheduler, step, config, rng, bad_steps}, written atomically

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "step", "config", "rng", "bad_steps"}


class TrainingError(RuntimeError):
    """A stage cannot go on (non-finite losses past --max_bad_steps, no good step at all)."""


class Checkpoints:
    """ckpt/<stage>/step_NNNNNNN.pt, written atomically; the newest keep_last are kept.
    run_keys: config keys that may differ between a checkpoint and the run resuming it."""

    def __init__(self, folder, keep_last, run_keys=()):
        self.folder, self.keep_last, self.run_keys = folder, keep_last, set(run_keys)

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
        path = os.path.join(self.folder, f"step_{step:07d}.pt")
        try:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        except (OSError, RuntimeError) as e:    # torch.save: "[enforce fail ...] unexpected pos"
            free = shutil.disk_usage(self.folder).free if os.path.isdir(self.folder) else 0
            raise TrainingError(f"cannot write checkpoint {path}: the write failed "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                                f"{free / 2**20:.0f} MiB free there -- is the disk full? The "
                                "checkpoints written before are kept") from None
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
                 for k, v in state["config"].items() if k not in self.run_keys and ours.get(k) != v]
        if diffs:
            raise ValueError(f"checkpoint {path} comes from another config:\n  "
                             + "\n  ".join(diffs))
        return state


def read_log(log_path):
    """log.jsonl -> (lines, records). A last line that is not a whole JSON record (a crash or a
    full disk mid-write) is dropped from the file, said on stderr; a bad line before it is a
    ValueError naming the file and line."""
    with open(log_path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise ValueError(f"{log_path} line {n}: not a JSON record ({e}); expected one "
                                 "record per line") from None
            print(f"{log_path}: dropping its torn last line {n} ({line.strip()[:40]!r}...): an "
                  "interrupted write", file=sys.stderr)
            lines.pop()
            write_text(log_path, "".join(lines))
    return lines, records


def drop_log_records(log_path, name, after_step):
    """Remove the log lines of stage `name` past `after_step` (a resumed run logs them again)."""
    if not os.path.isfile(log_path):
        return
    lines, records = read_log(log_path)
    keep = [line for line, r in zip(lines, records)
            if not (r.get("stage") == name and r["step"] > after_step)]
    if len(keep) != len(lines):
        write_text(log_path, "".join(keep))


# ----------------------------------------------------------------------------------------
# Around one stage's training loop (train.train_stage)

def lr_lambda(steps, warmup_frac):
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, int(steps * warmup_frac))

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return f


class StageRun:
    """The plumbing of one stage's loop: AdamW with a warmup-cosine schedule, resume from the
    stage's newest checkpoint (--resume), torch.compile, a progress bar, and at the end of each
    step: gradient clipping; a step whose loss or gradient is not finite is skipped (never
    saved), and past --max_bad_steps skipped steps, or with no good step at all, the stage
    stops with a TrainingError; log.jsonl; checkpoints; Ctrl-C / SIGTERM on any rank end the
    stage after the current step, with a checkpoint, by raising Interrupted.
    run_keys: config keys that may differ between a checkpoint and the run resuming it."""

    def __init__(self, cfg, runtime, stage, name, model, param_groups, steps, run_keys):
        self.cfg, self.runtime, self.name, self.model, self.steps = cfg, runtime, name, model, steps
        self.stage = stage
        self.params = [p for g in param_groups for p in g["params"]]
        self.opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95),
                                     weight_decay=cfg.weight_decay, fused=runtime.cuda)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(steps, cfg.warmup_frac))
        self.ckpts = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last, run_keys)
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.start, self.bad_steps, self.skipped_examples = 0, 0, 0
        if runtime.is_main:
            self.ckpts.remove_orphans()
        if cfg.resume and self.ckpts.paths():
            self.resume()
        elif cfg.resume and runtime.is_main:     # steps a crash logged before any checkpoint
            drop_log_records(self.log_path, name, after_step=0)
        if cfg.compile:     # a fresh compile per stage: no graph traced while others were frozen
            torch.compiler.reset()
        self.t_start = time.time()

    def resume(self):
        state = self.ckpts.load(self.ckpts.paths()[-1], self.cfg)
        unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.start, self.bad_steps = state["step"], state["bad_steps"]
        set_rng_state(state["rng"])
        if self.runtime.is_main:
            drop_log_records(self.log_path, self.name, after_step=self.start)  # the crash's steps
            was = state["config"][f"{self.stage}_steps"]
            if was != self.steps:
                print(f"{self.name}: resuming at step {self.start} of a run planned for {was} "
                      f"steps; training on to {self.steps} steps (the learning-rate schedule is "
                      f"that of {self.steps} steps) and then replacing this stage's model folder")

    def compiled(self, module):
        return torch.compile(module) if self.cfg.compile and module is not None else module

    def progress_bar(self):
        self.bar = tqdm(range(self.start, self.steps), desc=self.name, initial=self.start,
                        total=self.steps, disable=not self.runtime.is_main, leave=False)
        return self.bar

    def end_step(self, step, logs, counts, batches, stop_requested):
        cfg, runtime = self.cfg, self.runtime   # examples a streamed batch replaced: logged
        self.skipped_examples += sum(b.pop("skipped", 0) + b.pop("dropped", 0) for b in batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        *values, grad_norm = torch.stack([*logs.values(), grad_norm.double()]).tolist()  # 1 sync
        logs = {**runtime.sum_over_ranks(dict(zip(logs, values))),  # each rank's share, summed
                "tokens": counts["tokens"]}                         # (over ranks already)
        if not (math.isfinite(logs["loss"]) and math.isfinite(grad_norm)):
            return self.skip_bad_step()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        record = {"stage": self.name, "step": step + 1,                # time: s since stage start
                  "time": round(time.time() - self.t_start, 4), "lr": self.sched.get_last_lr()[0],
                  "grad_norm": grad_norm, "bad_steps": self.bad_steps,
                  "skipped_examples": self.skipped_examples, **logs}
        if runtime.cuda:
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
        stop = runtime.sum_over_ranks({"stop": float(stop_requested)})["stop"] > 0   # any rank
        if runtime.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.log_every == 0:
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k != "tokens"})
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == self.steps or stop:
                self.save(step + 1)
        if stop and step + 1 < self.steps:
            self.bar.close()
            raise Interrupted(f"{self.name} stopped at step {step + 1} of {self.steps}; "
                              f"checkpoint saved in {self.ckpts.folder}")

    def skip_bad_step(self):
        self.bad_steps += 1
        self.opt.zero_grad(set_to_none=True)
        if self.bad_steps > self.cfg.max_bad_steps:
            last = self.ckpts.paths()[-1] if self.ckpts.paths() else "none was written"
            raise TrainingError(f"{self.name}: {self.bad_steps} steps with non-finite loss or "
                                f"gradients (limit --max_bad_steps={self.cfg.max_bad_steps}); "
                                f"last good checkpoint: {last}; no model folder saved for this "
                                "stage")

    def save(self, step):
        self.ckpts.save(step, {"model": unwrap(self.model).state_dict(),
                               "optimizer": self.opt.state_dict(),
                               "scheduler": self.sched.state_dict(), "step": step,
                               "bad_steps": self.bad_steps, "config": asdict(self.cfg),
                               "rng": rng_state()})

    def finish(self):
        if self.bad_steps >= self.steps:
            raise TrainingError(f"{self.name}: all {self.steps} steps had a non-finite loss or "
                                "gradients; no model folder saved for this stage")
        wall = time.time() - self.t_start   # also the "time" of the stage's last log record
        if self.runtime.is_main:
            print(f"{self.name}: {self.steps - self.start} steps in {wall:.1f}s, {self.bad_steps} "
                  "skipped (non-finite loss or gradients)" + (
                      f", {self.skipped_examples} examples replaced (bad or too long)"
                      if self.skipped_examples else ""))


def unwrap(model):
    """The plain module under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# ----------------------------------------------------------------------------------------
# Interrupts: Ctrl-C and SIGTERM end a stage at a step boundary with a checkpoint

class Interrupted(Exception):
    """Raised by train.py after it saved the checkpoint of the step an interrupt arrived in."""


@contextmanager
def stop_requests():
    """While inside: Ctrl-C (SIGINT) and SIGTERM (a scheduler's kill) only set
    `.requested` on the yielded flag, so the training loop can finish its step, save a
    checkpoint and stop cleanly; a second Ctrl-C interrupts at once. Forked DataLoader workers
    inherit the handler and ignore the signal (Ctrl-C reaches the whole process group; the main
    process alone says it is stopping and stops them). Signal handlers can be set
    only in the main thread; elsewhere the flag just stays False."""
    flag, owner = SimpleNamespace(requested=False), os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:             # a forked DataLoader worker: the main process decides
            return
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)
    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:                       # not the main thread
        pass
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
