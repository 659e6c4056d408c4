"""
Device, precision and DDP (under torchrun), and the RNG state. Imports no module of this
repository.
"""
import ast
import os
import random
import shlex
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


# ----------------------------------------------------------------------------------------
# Device, precision and DDP

class Devices:
    """The devices a run uses: its device, precision and (under torchrun) the DDP process group."""

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
# Under torchrun: the command that starts the run again, and the failures one line names

def ranks():
    """(rank, world size) of this process as torchrun set them ((0, 1) without torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def launch_command(processes=None, script="train.py"):
    """The command that starts this run's processes again: `python train.py`, or under torchrun
    `torchrun --nproc_per_node=N train.py` with the same process counts (processes: that many on
    one machine instead). The batch of a step is --batch_size per process: another count is
    another run."""
    world = processes or ranks()[1]
    if world == 1:
        return f"python {script}"
    local = world if processes else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = "" if local == world else f"--nnodes={world // local} (and your rendezvous flags) "
    return f"torchrun {nodes}--nproc_per_node={local} {script}"


def resume_command(out_dir, processes=None, extra=""):
    """The command that resumes the run in out_dir (launch_command's), its path shell-quoted."""
    return (f"{launch_command(processes)} --out_dir={shlex.quote(out_dir)} --resume=true"
            + (f" {extra}" if extra else ""))


def lost_peer(err):
    """True for the error a collective (all_reduce, DDP's gradient sync, barrier) raises on the
    surviving ranks when another rank died or stopped on an error of its own."""
    if ranks()[1] == 1 or not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                            "gloo", "NCCL", "ProcessGroup"))


def out_of_memory(err):
    """True for CUDA's torch.OutOfMemoryError and the CPU allocator's RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in str(err)
                                           or "out of memory" in str(err)))


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
