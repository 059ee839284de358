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
"""

import json
import logging
import os

import keras

STATE_FILE = "checkpoint.json"
KEEP = 2

log = logging.getLogger("kd_keras")


def _fsync_replace(tmp, path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path, text):
    """Writes `text` to `path` so that readers see the old or the new file, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    _fsync_replace(tmp, path)


def read_state(directory):
    """The checkpoint.json of `directory` as {"step": int, "files": {step: path}} or None."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    files = {int(k): os.path.join(directory, v) for k, v in raw.get("files", {}).items()}
    return {"step": int(raw["step"]), "files": files}


def available_steps(directory):
    """Steps with a complete checkpoint in `directory`, newest first (empty if none)."""
    state = read_state(directory)
    if state is None:
        return []
    return sorted((s for s, p in state["files"].items() if os.path.isfile(p)), reverse=True)


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
        state = read_state(directory)
        path = state["files"].get(step) if state else None
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

    Place it after `NaNGuard`, which raises before a non-finite state could be saved.
    """

    def __init__(self, directory, save_freq="epoch", keep=KEEP):
        super().__init__()
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
                self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        self.save(self._step())

    def save(self, step):
        """Writes the checkpoint of `step` (once) and drops the ones beyond `keep`."""
        if step == self.last_saved or step == 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        name = f"ckpt-{step:09d}.weights.h5"
        tmp = os.path.join(self.directory, f"tmp{os.getpid()}-{name}")
        self.model.save_weights(tmp, overwrite=True)
        _fsync_replace(tmp, os.path.join(self.directory, name))
        state = read_state(self.directory) or {"files": {}}
        # Older steps only: checkpoints beyond `step` belong to a run this one replaced.
        files = {s: os.path.basename(p) for s, p in state["files"].items() if s < step}
        stale = {s: os.path.basename(p) for s, p in state["files"].items() if s > step}
        files[step] = name
        kept = sorted(files, reverse=True)[: self.keep]
        write_atomic(
            os.path.join(self.directory, STATE_FILE),
            json.dumps({"step": step, "files": {str(s): files[s] for s in kept}}, indent=1),
        )
        for s, n in {**files, **stale}.items():
            if s not in kept:
                try:
                    os.remove(os.path.join(self.directory, n))
                except FileNotFoundError:
                    pass
        self.last_saved = step
