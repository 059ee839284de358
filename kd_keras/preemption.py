"""Preemption: SIGTERM (what schedulers and preemptible VMs send) and SIGINT end a run cleanly.

While `fit` runs, `PreemptionGuard` turns the signal into a flag; at the next step boundary it
saves a checkpoint of the step just finished (through the run's `StepCheckpoint`) and raises
`Preempted`, which `kd_keras.train` reports in one line with exit code `Preempted.EXIT_CODE`
(75, EX_TEMPFAIL: "try again"). Re-running the same command resumes at that step.

A second signal while the checkpoint is being written is ignored, so an impatient Ctrl-C cannot
leave a half-written file; outside `fit` (data preparation, final evaluation, export) the
previous handlers apply, since every write there is atomic anyway.

Multi-worker runs: each worker receives its own signal, possibly at different steps, and a
worker that stopped alone would leave its peers blocked in a collective. There the guard is not
installed; the launcher's restart and the agreement on the newest common checkpoint
(`kd_keras.distributed.resume_step`) recover the run instead (docs/faults.md).
"""

import logging
import signal

import keras

from kd_keras import checkpointing

log = logging.getLogger("kd_keras")


class Preempted(Exception):
    """The run was stopped by a signal after saving a checkpoint."""

    EXIT_CODE = 75


class PreemptionGuard(keras.callbacks.Callback):
    """Saves and stops at the first step boundary after SIGTERM or SIGINT.

    Args:
      directory: the run's checkpoint directory (named in the message).
      signals: the signals handled.
    """

    def __init__(self, directory, signals=(signal.SIGTERM, signal.SIGINT)):
        super().__init__()
        self.directory = directory
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: saving at the end of this step", self.received)

    def on_train_begin(self, logs=None):
        from kd_keras import distributed

        if distributed.cluster_info() is not None:
            return
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave the process' handlers alone
                pass

    def on_train_end(self, logs=None):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def on_train_batch_end(self, batch, logs=None):
        if self.received is None:
            return
        step = int(self.model.optimizer.iterations.numpy())
        # A saver of its own (same directory, same atomic writes and rotation as the run's).
        saver = checkpointing.StepCheckpoint(self.directory)
        saver.set_model(self.model)
        saver.save(step, logs)
        self.on_train_end()
        raise Preempted(
            f"stopped by {self.received} after step {step}; checkpoint saved in "
            f"{self.directory}; run the same command again to resume"
        )
