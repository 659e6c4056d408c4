"""
Around one stage's training loop (train.train_stage), kept out of the method's reading path:
checkpoints, log.jsonl, resume, bad-step skipping, the progress bar and Ctrl-C / SIGTERM.
"""
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from types import SimpleNamespace

import torch
from tqdm import tqdm

from plumbing.devices import (lost_peer, out_of_memory, ranks, resume_command, rng_state,
                              set_rng_state)
from plumbing.files import WriteError, append_line, atomic_write, write_failed, write_text
from plumbing.flops import peak_tflops


# ----------------------------------------------------------------------------------------
# Checkpoints: {model, optimizer, scheduler, step, config, rng, bad_steps}, written atomically
# (and, since they were added: world_size, the divergence watch, its median loss)

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "step", "config", "rng", "bad_steps"}


class TrainingError(RuntimeError):
    """A stage cannot go on (non-finite losses past --max_bad_steps, no good step at all, a
    divergence). resume_flags: what to add to the resume command (a lower learning rate), or None
    where a resume would not help."""

    def __init__(self, message, resume_flags=None):
        super().__init__(message)
        self.resume_flags = resume_flags


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
            if out_of_memory(e):
                raise
            raise TrainingError(write_failed("checkpoint", path, e)
                                + " The checkpoints written before are kept") from None
        older = [p for p in self.paths() if p < path]          # never the one just written
        for old in older[:max(0, len(older) - (self.keep_last - 1))]:
            os.remove(old)

    def load(self, path, cfg, mmap=False):
        """The checkpoint at `path`, refused if it is not one or comes from another config (keys
        but run_keys). mmap=True: its tensors are mapped, not read (the checks before any work
        read the config and world size of a checkpoint that way)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
# Divergence: the loss or the gradient norm of a few steps far above the steps before, or a loss
# drifting up, stops the stage before its next checkpoint: the newest checkpoint is a sane one

RECENT, WINDOW = 5, 20      # a few steps (one noisy batch moves their median) and those before


def steps(n):
    return f"{n} step{'s' if n > 1 else ''}"


class DivergenceWatch:
    """The divergence rule (README, Training), over a stage's good steps (non-finite ones are
    skipped before it: StageBooks.finite_or_skip). A step diverges on
      a loss spike: the median loss of the last RECENT steps (of the later half, in a stage's
        first steps: a blow-up is caught before a checkpoint keeps it) is far above (over the
        ratio and 1 nat above, --max_loss_ratio) the median of the up to WINDOW steps before;
      a gradient spike: the median gradient norm of the last RECENT steps is over
        --max_grad_ratio x the median of the WINDOW before them, and over --grad_clip;
      a drift: the median loss of the last WINDOW steps is far above the lowest such median of
        the stage so far (a loss creeping up, with no spike).
    0 turns a ratio off. The tiny world's runs stay far inside: the default run's worst is a loss
    1.35 x its reference, a norm 2.1 x, a drift of 0.12 nat (the experiment runs' and the smoke
    preset's worst: a loss 1.5 x, a norm 8.5 x). The state is kept in each checkpoint: a resumed
    run stops where the uninterrupted one would."""

    def __init__(self, loss_ratio, grad_ratio, grad_clip, state=None):
        self.loss_ratio, self.grad_ratio, self.grad_clip = loss_ratio, grad_ratio, grad_clip
        state = state or {"losses": [], "norms": [], "best": None}
        self.losses, self.norms, self.best = list(state["losses"]), list(state["norms"]), \
            state["best"]

    def state(self):
        return {"losses": list(self.losses), "norms": list(self.norms), "best": self.best}

    def median(self):
        """The median loss of the last WINDOW steps (kept in each checkpoint), or None."""
        return statistics.median(self.losses[-WINDOW:]) if self.losses else None

    def check(self, loss, grad_norm):
        """One step's loss and gradient norm join the watch -> why the run diverges, or None."""
        return self.check_steps([(0, loss, grad_norm)])[1]

    def check_steps(self, pending):
        """Steps [(step, loss, grad_norm), ...] join the watch in order, up to the first that
        diverges -> (that step, why) or (None, None). One call per checkpoint (StageBooks), a loop
        over its steps: the same as a check after every step."""
        med, far = statistics.median, lambda x, ref: x > self.loss_ratio * ref and x > ref + 1.0
        for step, loss, grad_norm in pending:
            self.losses = (self.losses + [loss])[-(RECENT + WINDOW):]
            self.norms = (self.norms + [grad_norm])[-(RECENT + WINDOW):]
            losses, norms, why = self.losses, self.norms, None
            recent = min(RECENT, len(losses) // 2)
            if self.loss_ratio and recent and far(med(losses[-recent:]), med(losses[:-recent])):
                why = (f"the median loss of the last {steps(recent)}, {med(losses[-recent:]):.4g}, "
                       f"is over {self.loss_ratio:g} x and 1 nat above the median "
                       f"{med(losses[:-recent]):.4g} of the {steps(len(losses) - recent)} before "
                       "(a loss spike, --max_loss_ratio)")
            now, ref = (med(norms[-RECENT:]), med(norms[:-RECENT])) \
                if len(norms) == RECENT + WINDOW else (0.0, 0.0)
            if why is None and self.grad_ratio and now > max(self.grad_ratio * ref, self.grad_clip):
                why = (f"the median gradient norm of the last {RECENT} steps, {now:.4g}, is over "
                       f"{self.grad_ratio:g} x the median {ref:.4g} of the {WINDOW} steps before "
                       "and over --grad_clip (a gradient spike, --max_grad_ratio)")
            if len(losses) >= WINDOW:
                now = self.median()
                if why is None and self.best is not None and self.loss_ratio \
                        and far(now, self.best):
                    why = (f"the median loss of the last {WINDOW} steps, {now:.4g}, is over "
                           f"{self.loss_ratio:g} x and 1 nat above the stage's lowest, "
                           f"{self.best:.4g} (a drift, --max_loss_ratio)")
                self.best = now if self.best is None else min(self.best, now)
            if why is not None:
                return step, why
        return None, None


# ----------------------------------------------------------------------------------------
# The bookkeeping of one stage's loop (train.train_stage holds the update itself)

_running = None      # the StageBooks of the stage training now (running_stage)


def running_stage():
    """(stage name, the step in progress (1-based), its steps) of the stage training now, or
    None: where a failure mid-step (out of memory) happened."""
    return None if _running is None else (_running.name, _running.step + 1, _running.steps)

class StageBooks:
    """What runs around one stage's optimizer steps: resume from the stage's newest checkpoint
    (--resume: model, optimizer, schedule, step, RNG), the progress bar, and after each step
    (end_step) log.jsonl, checkpoints and Ctrl-C / SIGTERM on any rank, which end the stage after
    the current step, with a checkpoint, by raising Interrupted. A step whose loss or gradient is
    not finite is skipped (finite_or_skip), never saved; past --max_bad_steps skipped steps, or
    with no good step at all, the stage stops with a TrainingError.
    run_keys: config keys that may differ between a checkpoint and the run resuming it."""

    def __init__(self, cfg, devices, stage, name, model, opt, sched, steps, run_keys,
                 flops_fn=None):
        self.cfg, self.devices, self.name, self.model, self.steps = cfg, devices, name, model, steps
        self.stage, self.opt, self.sched = stage, opt, sched
        # throughput: real tokens/s every step; on CUDA also MFU (flops_fn(batch): model FLOPs)
        self.flops_fn, self.step_flops = flops_fn, 0.0
        self.peak = peak_tflops(torch.cuda.get_device_name(devices.device)) if devices.cuda \
            else None
        self.ckpts = Checkpoints(os.path.join(cfg.out_dir, "ckpt", name), cfg.keep_last, run_keys)
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.start, self.bad_steps, self.skipped_examples = 0, 0, 0
        self.watch = DivergenceWatch(cfg.max_loss_ratio, cfg.max_grad_ratio, cfg.grad_clip)
        self.pending = []                  # the steps since the last checkpoint, for the watch
        if devices.is_main:
            self.ckpts.remove_orphans()
        if cfg.resume and self.ckpts.paths():
            self.resume()
        elif cfg.resume and devices.is_main:     # steps a crash logged before any checkpoint
            drop_log_records(self.log_path, name, after_step=0)
        if cfg.compile:     # a fresh compile per stage: no graph traced while others were frozen
            torch.compiler.reset()
        self.t_start = self.t_last = time.time()
        global _running
        self.step, _running = self.start, self

    def resume(self):
        state = self.ckpts.load(self.ckpts.paths()[-1], self.cfg)
        peaks = [g["initial_lr"] for g in self.opt.param_groups]       # this run's learning rates
        unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.start, self.bad_steps = state["step"], state["bad_steps"]
        set_rng_state(state["rng"])
        self.watch = DivergenceWatch(self.watch.loss_ratio, self.watch.grad_ratio,
                                     self.watch.grad_clip, state.get("watch"))
        was = [g["initial_lr"] for g in self.opt.param_groups]
        if was != peaks:           # a resume that changes a learning rate: the same schedule
            for g, peak, factor in zip(self.opt.param_groups, peaks, self.sched.lr_lambdas):
                g["initial_lr"], g["lr"] = peak, peak * factor(self.sched.last_epoch)
            self.sched.base_lrs = list(peaks)
            self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
            if self.devices.is_main:
                print(f"{self.name}: resuming at step {self.start} with the peak learning rate(s) "
                      f"{', '.join(f'{p:g}' for p in peaks)} (the checkpoint's: "
                      f"{', '.join(f'{p:g}' for p in was)}), on the same schedule")
        if self.devices.is_main:
            drop_log_records(self.log_path, self.name, after_step=self.start)  # the crash's steps
            was = state["config"][f"{self.stage}_steps"]
            if was != self.steps:
                print(f"{self.name}: resuming at step {self.start} of a run planned for {was} "
                      f"steps; training on to {self.steps} steps (the learning-rate schedule is "
                      f"that of {self.steps} steps) and then replacing this stage's model folder")

    def progress_bar(self):
        self.bar = tqdm(range(self.start, self.steps), desc=self.name, initial=self.start,
                        total=self.steps, disable=not self.devices.is_main, leave=False)
        return self.bar

    def lower_lr_flags(self):
        """The flags that halve this stage's learning rates (a resume may change them)."""
        return " ".join(f"--{k}={v / 2:g}" for k, v in asdict(self.cfg).items()
                        if k.startswith(self.stage + "_") and k.endswith("_lr"))

    def last_checkpoint(self):
        """The newest checkpoint of the stage and its median loss, said in words."""
        paths = self.ckpts.paths()
        if not paths:
            return "none was written (a resume starts the stage again)"
        try:
            loss = self.ckpts.load(paths[-1], self.cfg, mmap=True).get("loss")
        except ValueError:
            loss = None
        return paths[-1] + (f" (median loss {loss:.4g} over its last {WINDOW} steps)"
                            if loss is not None else "")

    def gather(self, logs, grad_norm, counts, batches):
        """The step's logs and grad norm as floats (one device sync), summed over ranks."""
        self.step += 1                     # the step in progress next, for running_stage()
        self.skipped_examples += sum(b.pop("skipped", 0) + b.pop("dropped", 0) for b in batches)
        if self.flops_fn:                                                  # host, from shapes
            self.step_flops = sum(self.flops_fn(b) for b in batches) * self.devices.world_size
        *values, grad_norm = torch.stack([*logs.values(), grad_norm.double()]).tolist()
        return {**self.devices.sum_over_ranks(dict(zip(logs, values))),  # each rank's share
                "grad_norm": grad_norm, "tokens": counts["tokens"]}      # (over ranks already)

    def finite_or_skip(self, logs):
        """True if the loss and gradient norm are finite, else False (at most --max_bad_steps)."""
        if math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"]):
            return True
        self.bad_steps += 1
        if self.bad_steps > self.cfg.max_bad_steps:
            last = self.ckpts.paths()[-1] if self.ckpts.paths() else "none was written"
            raise TrainingError(f"{self.name}: {self.bad_steps} steps with non-finite loss or "
                                f"gradients (limit --max_bad_steps={self.cfg.max_bad_steps}); "
                                f"last good checkpoint: {last}; no model folder saved for this "
                                "stage", resume_flags=self.lower_lr_flags())
        return False

    def check_divergence(self):
        """Every rank, before a checkpoint (the values are summed over ranks): the steps since the
        last one join the watch (DivergenceWatch); a diverging one ends the stage with a
        TrainingError, and the checkpoint is not written."""
        step, why = self.watch.check_steps(self.pending)
        self.pending = []
        if why is not None:
            self.bar.close()
            raise TrainingError(f"{self.name}: diverging at step {step}: {why}. Last checkpoint, "
                                f"written before it: {self.last_checkpoint()}; no model folder "
                                "saved for this stage", resume_flags=self.lower_lr_flags())

    def end_step(self, step, logs, stop_requested):
        """After an update: log.jsonl, the bar, checkpoints; Ctrl-C / SIGTERM raise Interrupted."""
        cfg, devices = self.cfg, self.devices
        grad_norm, now = logs.pop("grad_norm"), time.time()
        seconds, self.t_last = max(now - self.t_last, 1e-9), now
        record = {"stage": self.name, "step": step + 1,                # time: s since stage start
                  "time": round(now - self.t_start, 4), "lr": self.sched.get_last_lr()[0],
                  "grad_norm": grad_norm, "bad_steps": self.bad_steps,
                  "skipped_examples": self.skipped_examples, **logs,
                  "tokens_per_s": round(logs["tokens"] / seconds, 1)}   # real tokens, all ranks
        if self.peak and self.step_flops:
            record["mfu"] = round(self.step_flops / seconds / (self.peak * 1e12), 4)
        if devices.cuda:
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(devices.device) / 2**30
        stop = devices.sum_over_ranks({"stop": float(stop_requested)})["stop"] > 0   # any rank
        self.pending.append((step + 1, record["loss"], grad_norm))   # the divergence watch's
        save = (step + 1) % cfg.ckpt_every == 0 or step + 1 == self.steps or stop
        if devices.is_main:
            append_line(self.log_path, json.dumps(record))      # a full disk: a WriteError
        if save:
            self.check_divergence()                             # before the checkpoint
        if devices.is_main:
            if (step + 1) % cfg.log_every == 0:              # losses, tokens/s, (CUDA) MFU
                self.bar.set_postfix({k: f"{record[k]:.4g}" for k in (*logs, "tokens_per_s", "mfu")
                                      if k in record and k != "tokens"})
            if save:
                self.save(step + 1)
        if stop and step + 1 < self.steps:
            self.bar.close()
            raise Interrupted(f"{self.name} stopped at step {step + 1} of {self.steps}; "
                              f"checkpoint saved in {self.ckpts.folder}")

    def save(self, step):
        self.ckpts.save(step, {"model": unwrap(self.model).state_dict(),
                               "optimizer": self.opt.state_dict(),
                               "scheduler": self.sched.state_dict(), "step": step,
                               "bad_steps": self.bad_steps, "config": asdict(self.cfg),
                               "rng": rng_state(), "world_size": self.devices.world_size,
                               "watch": self.watch.state(), "loss": self.watch.median()})

    def finish(self):
        global _running
        _running = None
        if self.bad_steps >= self.steps:
            raise TrainingError(f"{self.name}: all {self.steps} steps had a non-finite loss or "
                                "gradients; no model folder saved for this stage")
        wall = time.time() - self.t_start   # also the "time" of the stage's last log record
        if self.devices.is_main:
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


# ----------------------------------------------------------------------------------------
# How a run ends: one line for each failure a user can act on (train.main)

def failure_line(e, cfg):
    """train.main's one line for the exception `e` that ended a run of config `cfg` (None when
    get_config failed), or None: not ours to say, it keeps its traceback. Under torchrun each
    process says which it is; where a resume helps, the line ends with its command."""
    rank, world = ranks()
    who = f"train.py: rank {rank} of {world}: " if world > 1 else "train.py: "
    resume = resume_command(cfg.out_dir) if cfg else ""
    if isinstance(e, Interrupted):
        return f"{who}interrupted: {e}. Resume with: {resume}"
    if isinstance(e, KeyboardInterrupt):                  # a second Ctrl-C: at once
        return f"{who}stopped at once (a second Ctrl-C); every file written is whole (writes " \
               "are atomic)" + (f". Resume with: {resume}" if cfg else "")
    if isinstance(e, TrainingError) and e.resume_flags is not None:
        return f"{who}{e}. Resume with: {resume_command(cfg.out_dir, extra=e.resume_flags)}"
    if isinstance(e, WriteError):
        return f"{who}{e} Nothing half-written is kept; free some space, then resume with: " \
               f"{resume}"
    if isinstance(e, (ValueError, FileNotFoundError, TrainingError)):
        mid_run = world > 1 and running_stage() is not None
        return f"{who}{e}" + (f" (the other processes stop too; once this is fixed, resume "
                              f"with: {resume})" if mid_run else "")
    if lost_peer(e):                        # gloo: "[.../pair.cc:553] Connection closed by peer"
        why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0]).split(". ")[0]
        return (f"{who}stopped: another process of this run ended ({why[:120]}); one that failed "
                f"says why on its own line. Once that is fixed, resume with: {resume}")
    if out_of_memory(e) and cfg is not None:
        stage = running_stage()
        at = (f"in stage {stage[0]} at step {stage[1]} of {stage[2]}" if stage
              else "outside the training steps")
        return (f"{who}out of memory {at} ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0][:120]}) with --batch_size={cfg.batch_size} "
                f"examples per micro-batch per process, --grad_accum={cfg.grad_accum}: lower "
                "--batch_size and raise --grad_accum as much (the same examples per step), or set "
                "--grad_checkpointing=true (activations recomputed in backward); nothing of this "
                "step was saved. A resume may add --grad_checkpointing=true: "
                f"{resume_command(cfg.out_dir, extra='--grad_checkpointing=true')}; a smaller "
                "--batch_size is a new run (another --out_dir)")
    return None
