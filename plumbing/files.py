"""
Files: every write is atomic (temp file + fsync + rename), a model folder is written whole or
not at all, and one run holds its out_dir's lock. Imports no module of this repository.
"""
import fcntl
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, suppress


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


def append_line(path, line):
    """One line appended to a text file (log.jsonl); a failed write is a WriteError naming it."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise WriteError(write_failed("the log", path, e)) from None


# ----------------------------------------------------------------------------------------
# A write that fails (a full disk, a quota): one line naming the file, not a traceback

class WriteError(RuntimeError):
    """A file or folder could not be written; the message names it and the free space."""


def write_failed(what, path, err):
    """The message of a failed write: what, where, the error's first line and the free space."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    first = (str(err).splitlines() or [""])[0][:120]
    return (f"cannot write {what} {path}: the write failed ({type(err).__name__}: {first}); "
            f"{free / 2**20:.0f} MiB free there -- is the disk full?")


def is_write_failure(err):
    """An OSError, or what torch.save / safetensors raise when the disk fills mid-write."""
    return isinstance(err, OSError) or any(s in str(err) for s in (
        "No space left", "StorageFull", "file write failed", "unexpected pos", "Disk quota"))


@contextmanager
def writing(what, path):
    """Inside: a failed write (is_write_failure) becomes a WriteError naming `what` and `path`;
    any other error keeps its traceback."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise WriteError(write_failed(what, path, e)) from None


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
    is replaced only once the new one is whole). A failed write (a full disk) is a WriteError;
    the temp folder is removed (one a kill leaves: remove_stale_temps at the next run)."""
    parent = os.path.dirname(os.path.abspath(folder))
    with writing("the model folder", folder):
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


def remove_stale_temps(folder):
    """The temp files and folders (.tmp-*) of atomic writes and whole-folder saves that a kill
    interrupted, directly in `folder`, and the set-aside .old-<name>-* of a replaced folder whose
    new <name> is in place. Call only while holding the folder (FolderLock): no write is running.
    Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        old_of = name[len(".old-"):].rsplit("-", 1)[0] if name.startswith(".old-") else None
        if name.startswith(".tmp-") or (old_of and os.path.isdir(os.path.join(folder, old_of))):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


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
