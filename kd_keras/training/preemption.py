"""Preemption: SIGTERM (what schedulers and preemptible VMs send) and SIGINT end a run cleanly.

While `fit` runs, `PreemptionGuard` turns the signal into a flag; at the next step boundary it
saves a checkpoint of the step just finished (through the run's `StepCheckpoint`) and raises
`Preempted`, which `kd_keras.train` reports in one line with exit code `Preempted.EXIT_CODE`
(75, EX_TEMPFAIL: "try again"). Re-running the same command resumes at that step.

A second signal while the checkpoint is being written is ignored, so an impatient Ctrl-C cannot
leave a half-written file; outside `fit` (data preparation, final evaluation, export) the
previous handlers apply, since every write there is atomic anyway.

Multi-worker runs: each worker receives its own signal, possibly at different steps, and a
worker that stopped alone would leave its peers blocked in a collective. So under
MultiWorkerMirroredStrategy the workers agree, every `agree_every` steps (the run's
--save_freq, or once per epoch), through one all-gather of a 0/1 flag: if any worker was
signalled, all save that same step and stop (what
`tf.distribute.experimental.PreemptionCheckpointHandler` does for custom loops, in a form that
fits Keras' `fit` and our step checkpoints). `kd_keras.launch` forwards SIGTERM/SIGINT to its
workers and exits with the same code once all have saved.
"""

import logging
import signal

import keras

from kd_keras import choices
from kd_keras.artifacts import checkpointing

log = logging.getLogger("kd_keras")


class Preempted(Exception):
    """The run was stopped by a signal after saving a checkpoint."""

    EXIT_CODE = choices.PREEMPTED_EXIT_CODE


class PreemptionGuard(keras.callbacks.Callback):
    """Saves and stops at the first step boundary after SIGTERM or SIGINT.

    Args:
      directory: the run's checkpoint directory (named in the message).
      signals: the signals handled.
      agree_every: multi-worker runs agree on stopping every this many steps (None: at epoch
        ends).
      data: the run's step <-> data mapping, recorded with the checkpoint as the run's own
        saves do, so that the resume can verify it (`kd_keras.training.run.data_mapping`).
    """

    def __init__(
        self, directory, signals=(signal.SIGTERM, signal.SIGINT), agree_every=None, data=None
    ):
        super().__init__()
        self.directory = directory
        self.data = data
        self.signals = tuple(signals)
        self.agree_every = agree_every
        self.received = None
        self._previous = {}
        self._agreement = None

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: saving at the end of this step", self.received)

    def on_train_begin(self, logs=None):
        from kd_keras.training import distributed

        if distributed.cluster_info() is not None:
            self._agreement = _FlagAgreement(self.model.distribute_strategy)
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
        if self._agreement is None and self.received is None:
            return  # the common case: no host read of the step counter
        step = int(self.model.optimizer.iterations.numpy())
        if self._agreement is not None:
            if not self.agree_every or step % self.agree_every:
                return
            if not self._agreement.any(self.received is not None):
                return
            self.received = self.received or "a peer worker's signal"
        elif self.received is None:
            return
        self._stop(step, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._agreement is not None and not self.agree_every:
            step = int(self.model.optimizer.iterations.numpy())
            if self._agreement.any(self.received is not None):
                self.received = self.received or "a peer worker's signal"
                self._stop(step, logs)

    def _stop(self, step, logs):
        # A saver of its own (same directory, same atomic writes and rotation as the run's).
        saver = checkpointing.StepCheckpoint(self.directory, data=self.data)
        saver.set_model(self.model)
        saver.save(step, logs)
        self.on_train_end()
        raise Preempted(
            f"stopped by {self.received} after step {step}; checkpoint saved in "
            f"{self.directory}; run the same command again to resume"
        )


class _FlagAgreement:
    """Whether any worker has a flag set: one all-gather of a scalar, traced once."""

    def __init__(self, strategy):
        import tensorflow as tf

        self.strategy = strategy
        self.tf = tf

        @tf.function
        def _any(flag):
            # all_gather, as kd_keras.training.distributed.gather_ints: the collective that works for
            # int64 scalars under MultiWorkerMirroredStrategy on CPUs.
            flags = tf.distribute.get_replica_context().all_gather(tf.reshape(flag, [1]), axis=0)
            return tf.reduce_max(flags)

        self._any = _any

    def any(self, flag):
        value = self.tf.constant(int(bool(flag)), self.tf.int64)
        result = self.strategy.run(self._any, args=(value,))
        return int(self.strategy.experimental_local_results(result)[0].numpy()) > 0
