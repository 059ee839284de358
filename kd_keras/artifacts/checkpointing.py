"""Step-exact training checkpoints: resume after a kill at any point with the same step count.

Keras' `BackupAndRestore` records the fit epoch and, when it saves every N steps, restores the
mid-epoch weights but replays the whole epoch, so a killed run ends with more optimizer steps
(and a shifted learning-rate schedule) than an uninterrupted one. `StepCheckpoint` records the
optimizer step itself instead, and `train.run` resumes exactly there: the data pipeline skips
the consumed batches and the first `fit` call runs only the rest of the interrupted epoch.

Layout of a checkpoint directory:

  ckpt-000000120.weights.h5   model + optimizer state after 120 optimizer steps
  ckpt-000000100.weights.h5   the previous one (kept in case the newest cannot be read)
  checkpoint.json             {"step": 120, "files": {"120": "...", "100": "..."}}

Every file is written under a temporary name and renamed into place, and checkpoint.json is
replaced last, so a process killed at any moment leaves the previous complete state: the JSON
only ever names weight files that were completely written.

Faults (see docs/faults.md):
  * A checkpoint is serialised in memory and written with plain file I/O, so a full disk or a
    permission error is one `CheckpointWriteError` naming the path, with the temporary file
    removed; h5py never sees the failing write (it used to crash the process with a
    segmentation fault when the disk filled).
  * Checkpoints are found by name too (`ckpt-<step>.weights.h5`), so a lost checkpoint.json
    does not restart the run from step 0.
  * A checkpoint that cannot be opened (truncated, corrupt) is skipped: `set_aside_unreadable`
    renames it to `<name>.unreadable` (kept, never deleted) and the previous one is used.
  * Rotation deletes old checkpoints only after the new one has been read back, and moves
    checkpoints newer than the saved step (a future this run replaced) aside instead of
    deleting them.
"""

import io
import json
import logging
import os
import re

import keras
import numpy as np

# The h5 serialisation Keras' own `save_weights` uses, pointed at a BytesIO (keras is pinned to
# 3.15 in setup.cfg; `test_checkpoint_bytes_load_with_keras` pins the round trip).
from keras.src.saving import saving_lib

STATE_FILE = "checkpoint.json"
KEEP = 2
UNREADABLE_SUFFIX = ".unreadable"
SUPERSEDED_SUFFIX = ".superseded"
_NAME = re.compile(r"^ckpt-(\d{9})\.weights\.h5$")


class CheckpointWriteError(OSError):
    """A checkpoint (or its state file) could not be written; nothing half-written is left."""

log = logging.getLogger("kd_keras")


def _fsync_replace(tmp, path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path, text):
    """Writes `text` (str or bytes) to `path`: readers see the old or the new file, never a part.

    Raises:
      CheckpointWriteError: the write failed (disk full, permissions); the temporary file is
        removed and `path` is untouched.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    data = text.encode() if isinstance(text, str) else text
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointWriteError(
            f"cannot write {path}: {err.strerror or err} (nothing was replaced)"
        ) from err



def write_json(path, obj, indent=2):
    """Writes `obj` as JSON to `path` atomically (see `write_atomic`: old or new file, never a
    part).

    Args:
      path: file to (re)place.
      obj: anything `json.dumps` accepts.
      indent: JSON indentation (2, as every kd_keras results/manifest file).
    Raises:
      TypeError: `obj` is not JSON-serialisable (nothing is written).
      CheckpointWriteError: the write failed (`path` untouched).
    """
    write_atomic(path, json.dumps(obj, indent=indent))

def checkpoint_bytes(model):
    """The `.weights.h5` file `model.save_weights` would write, as bytes (built in memory)."""
    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    saving_lib._save_state(
        model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set()
    )
    store.close()
    return buffer.getvalue()


def is_readable(path):
    """Whether `path` opens as a complete HDF5 file (a truncated one fails HDF5's EOF check)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return len(f.keys()) > 0
    except (OSError, ValueError):
        return False


def read_state(directory):
    """The checkpoint.json of `directory` as {"step", "files": {step: path}, "logs"} or None.

    A checkpoint.json that cannot be parsed counts as absent (files are then found by name).
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        files = {int(k): os.path.join(directory, v) for k, v in raw.get("files", {}).items()}
        return {
            "step": int(raw["step"]),
            "files": files,
            "logs": raw.get("logs", {}),
            "data": raw.get("data"),
        }
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable %s; checkpoints are found by name", path)
        return None


def checkpoint_files(directory):
    """{step: path} of every checkpoint in `directory`: those checkpoint.json names and those
    found by their `ckpt-<step>.weights.h5` name (checkpoint.json may have been lost)."""
    files = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            match = _NAME.match(name)
            if match:
                files[int(match.group(1))] = os.path.join(directory, name)
    state = read_state(directory)
    for step, path in (state["files"] if state else {}).items():
        if os.path.isfile(path):
            files.setdefault(step, path)
    return files


def available_steps(directory):
    """Steps with a readable checkpoint in `directory`, newest first (empty if none)."""
    files = checkpoint_files(directory)
    return sorted((s for s, p in files.items() if is_readable(p)), reverse=True)


def last_logs(directory):
    """The epoch/batch logs recorded with the newest checkpoint ({} when none)."""
    state = read_state(directory)
    return dict(state.get("logs") or {}) if state else {}


def set_aside_unreadable(directory):
    """Renames every unreadable checkpoint of `directory` to `<name>.unreadable` (kept for
    inspection, never deleted) with a warning naming it; returns the renamed paths."""
    moved = []
    for step, path in sorted(checkpoint_files(directory).items()):
        if not is_readable(path):
            os.replace(path, path + UNREADABLE_SUFFIX)
            log.warning(
                "checkpoint %s (step %d) cannot be read; set aside as %s, resuming from an "
                "earlier one", path, step, path + UNREADABLE_SUFFIX,
            )
            moved.append(path + UNREADABLE_SUFFIX)
    return moved


def copy_newest(directory, dest, attempts=5):
    """Copies the newest readable checkpoint of `directory` to the file `dest`, retrying when a
    training run rotates it away mid-copy; returns (step, dest) or None when there is none."""
    import shutil

    for _ in range(attempts):
        files = checkpoint_files(directory)
        for step in sorted(files, reverse=True):
            try:
                shutil.copyfile(files[step], dest)
            except FileNotFoundError:  # rotated away since the listing
                break
            if is_readable(dest):
                return step, dest
        else:
            return None
    return None


def restore(model, directories, step):
    """Loads the checkpoint of optimizer step `step` into `model` (built and compiled).

    Args:
      model: the keras.Model that wrote the checkpoint.
      directories: checkpoint directories searched in order (a worker's own first, then the
        chief's: all workers hold the same weights at the same step).
      step: the step to restore; 0 restores nothing.

    Raises:
      FileNotFoundError: no directory has a readable checkpoint of `step`.
    """
    if step == 0:
        return
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    tried = []
    for directory in directories:
        path = checkpoint_files(directory).get(step)
        if not path or not os.path.isfile(path):
            continue
        try:
            model.load_weights(path)
        except OSError as err:  # unreadable file: try the next copy
            tried.append(f"{path} ({err})")
            continue
        restored = int(model.optimizer.iterations.numpy())
        if restored != step:
            raise ValueError(f"Checkpoint {path} holds step {restored}, expected {step}.")
        log.info("resumed from %s (step %d)", path, step)
        return
    raise FileNotFoundError(
        f"No readable checkpoint of step {step} in {list(directories)}"
        + (f"; unreadable: {tried}" if tried else "")
        + "."
    )


class StepCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer state every `save_freq` steps and at every epoch end.

    Args:
      directory: where checkpoints are written (see the module docstring).
      save_freq: "epoch", or an int N: also save whenever the optimizer step is a multiple
        of N (the step count, not the batch index in the epoch, so a resumed run saves at the
        same steps as an uninterrupted one).
      keep: checkpoints kept on disk (the newest `keep`).
      data: JSON-able dict recorded in checkpoint.json with every checkpoint (see
        `kd_keras.training.run.data_mapping`).

    Place it after `NaNGuard`, which raises before a non-finite state could be saved.
    """

    def __init__(self, directory, save_freq="epoch", keep=KEEP, data=None):
        super().__init__()
        # What maps a step to its examples (global batch, dataset listing, seed, views),
        # recorded with every checkpoint so that a resume can refuse a different one.
        self.data = data
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise ValueError(f"--save_freq must be 'epoch' or a positive int, got {save_freq!r}.")
        self.directory = directory
        self.save_freq = save_freq
        self.keep = keep
        self.last_saved = None

    def on_train_begin(self, logs=None):
        # Temporary files of a process killed while saving.
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith("tmp") or ".tmp" in name:
                    os.remove(os.path.join(self.directory, name))

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq != "epoch":
            step = self._step()
            if step % self.save_freq == 0:
                self.save(step, logs)

    def on_epoch_end(self, epoch, logs=None):
        step = self._step()
        if step == self.last_saved:  # saved at this step's batch end: add the epoch's logs
            self._record_logs(logs)
        else:
            self.save(step, logs)

    def _record_logs(self, logs):
        state = read_state(self.directory)
        if state is None or not logs:
            return
        state["logs"] = _numbers(logs)
        state["files"] = {str(s): os.path.basename(p) for s, p in state["files"].items()}
        write_atomic(os.path.join(self.directory, STATE_FILE), json.dumps(state, indent=1))

    def save(self, step, logs=None):
        """Writes the checkpoint of `step` (once) and drops the ones beyond `keep`.

        `logs` (the epoch or batch logs) are recorded in checkpoint.json, so that a run killed
        after training still reports its final losses when it is re-run.

        Raises:
          CheckpointWriteError: disk full, permissions: one line naming the path; the previous
            checkpoints and checkpoint.json are untouched.
        """
        if step == self.last_saved or step == 0:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise CheckpointWriteError(f"cannot create {self.directory}: {err.strerror}") from err
        name = f"ckpt-{step:09d}.weights.h5"
        path = os.path.join(self.directory, name)
        write_atomic(path, checkpoint_bytes(self.model))
        if not is_readable(path):  # never rotate away the old ones for an unreadable new one
            raise CheckpointWriteError(f"checkpoint {path} was written but cannot be read back")
        files = {s: os.path.basename(p) for s, p in checkpoint_files(self.directory).items()}
        newer = {s: n for s, n in files.items() if s > step}  # a future this run replaced
        older = {s: n for s, n in files.items() if s < step}
        older[step] = name
        kept = sorted(older, reverse=True)[: self.keep]
        state = {
            "step": step,
            "files": {str(s): older[s] for s in kept},
            "logs": _numbers(logs),
        }
        if self.data is not None:
            state["data"] = self.data
        write_atomic(os.path.join(self.directory, STATE_FILE), json.dumps(state, indent=1))
        for s, n in older.items():
            if s not in kept:
                _remove(os.path.join(self.directory, n))
        for n in newer.values():
            src = os.path.join(self.directory, n)
            os.replace(src, src + SUPERSEDED_SUFFIX)
            log.warning("checkpoint %s is newer than this run's step %d; kept as %s",
                        src, step, src + SUPERSEDED_SUFFIX)
        self.last_saved = step


def _numbers(logs):
    """The numeric entries of Keras logs as floats (JSON-ready)."""
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(np.asarray(value).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            pass
    return out


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
