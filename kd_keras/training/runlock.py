"""One training run per workdir: an exclusive lock on `<workdir>/run.lock`.

The lock is `fcntl.flock` on the open file, so the kernel releases it when the holder ends in
any way (exit, crash, kill -9): a lock file left by a dead process is simply taken over. The
file also records the holder's pid, host and start time, which is what a second run's error
names. The file is never deleted (a process may be waiting on that very inode).
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = "run.lock"


class WorkdirError(Exception):
    """The workdir cannot be used: a file, not writable, or held by another run."""


def prepare_workdir(workdir):
    """Creates `workdir` if needed and checks that it is a writable directory.

    Raises:
      WorkdirError: naming --workdir, when it is a file or cannot be written.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory.")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"--workdir={workdir} cannot be created: {err.strerror}.") from err
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir} is not writable.")


@contextlib.contextmanager
def hold(workdir, lock_file=LOCK_FILE, what="run"):
    """Holds `workdir`'s run lock for the block (creating the directory first).

    `lock_file` and `what` let another kind of job (an experiment runner) hold a lock of its
    own in a directory whose runs hold theirs.

    Raises:
      WorkdirError: another live process holds the lock (its pid and host named), or the
        workdir is a file / not writable.
    """
    prepare_workdir(workdir)
    path = os.path.join(workdir, lock_file)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WorkdirError(
            f"--workdir={workdir} is not writable: {err.strerror} ({path})."
        ) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"--workdir={workdir} is in use by another {what} "
                f"({_describe(read_holder(path))}); "
                "wait for it to end or choose another --workdir."
            ) from None
        _write_holder(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it; a record left: a dead holder
    finally:
        os.close(fd)  # releases the lock


def read_holder(path):
    """The holder record ({"pid", "host", "started"}) in a lock file, {} if unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _describe(holder):
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _write_holder(fd):
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
