"""Command line: `python -m kd_keras.train` (console script `kd-train`) parses the training flags and
runs `kd_keras.training.run.run`; every step of a run lives in kd_keras.training."""

import functools
import sys

from absl import app, flags

from kd_keras import cli
from kd_keras import config as config_lib
from kd_keras.training import run

config_lib.define_flags()


def _run_worker(cfg):
    """`run.run(cfg)`; in a multi-worker run a peer's failure restarts this process (see
    kd_keras.training.distributed.restart_after_peer_failure) instead of ending it."""
    try:
        run.run(cfg)
    except Exception as err:
        if cfg.strategy == "multi_worker":
            from kd_keras.training import distributed

            if distributed.is_peer_failure(err):
                distributed.restart_after_peer_failure(err, cfg.worker_restarts)
        raise


HELP = """Distils a teacher into a student (or trains SwAV / OSS / a supervised baseline) and writes
everything into --workdir: checkpoints (a rerun resumes), TensorBoard logs, results.json with
the k-NN accuracies, and export/backbone.keras (the student, a plain Keras model).
Example: kd_keras.train --flagfile=flags/simreg.cfg --workdir=/tmp/run --teacher=/m.keras"""
HELP_FLAGS = (
    "workdir",
    "flagfile",
    "method",
    "teacher",
    "student",
    "dataset",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "head",
    "teacher_cache",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_logging()
    # The flags first, before anything imports TensorFlow: bad input fails in a second.
    with cli.one_line_errors("kd_keras.train", (run.UsageError, ValueError, FileNotFoundError)):
        cfg = config_lib.config_from_flags(flags.FLAGS)
    cli.import_tensorflow_quietly()
    from kd_keras.artifacts.checkpointing import CheckpointWriteError
    from kd_keras.training.callbacks import NonFiniteLoss
    from kd_keras.training.preemption import Preempted
    from kd_keras.training.runlock import WorkdirError

    errors = (
        run.UsageError,
        ValueError,
        FileNotFoundError,
        NonFiniteLoss,
        TimeoutError,
        CheckpointWriteError,
        WorkdirError,
    )
    with cli.one_line_errors("kd_keras.train", errors):
        try:
            _run_worker(cfg)
        except Preempted as stop:
            print(f"kd_keras.train: {stop}", file=sys.stderr, flush=True)
            sys.exit(Preempted.EXIT_CODE)


def run_cli():
    """Entry point of the `kd-train` console script."""
    cli.exit_with_help_if_asked("kd_keras.train", HELP, HELP_FLAGS)
    app.run(
        main, flags_parser=functools.partial(config_lib.parse_command_line, prog="kd_keras.train")
    )


if __name__ == "__main__":
    run_cli()
