"""Command line: `python -m kd_keras.experiment` (console script `kd-experiment`) runs an experiment spec
(kd_keras.experiments.runner)."""

import functools
import sys

from absl import app, flags

from kd_keras import cli
from kd_keras import config as config_lib
from kd_keras.experiments import runner

config_lib.define_experiment_flags()


HELP = """Runs a whole experiment spec (several training runs and their evaluation) and writes its
report; finished runs are skipped, so a rerun continues."""
HELP_FLAGS = (
    "spec",
    "workdir",
    "scale",
    "only",
    "dry_run",
    "report_only",
    "report_dir",
    "teachers_only",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_logging()
    from kd_keras.training.runlock import WorkdirError

    with cli.one_line_errors("kd_keras.experiment", (ValueError, FileNotFoundError, WorkdirError)):
        cfg = config_lib.experiment_config_from_flags(flags.FLAGS)
        try:
            code = runner.run_experiment(cfg)
        except runner.StepFailed as err:
            print(
                f"kd_keras.experiment: {err}; run the same command again to resume.",
                file=sys.stderr,
                flush=True,
            )
            code = err.code if isinstance(err.code, int) else 1
            if code < 0:  # the step was killed by signal -code: the shell's convention
                code = 128 - code
    sys.exit(code)


def run_cli():
    """Entry point of the `kd-experiment` console script."""
    cli.exit_with_help_if_asked("kd_keras.experiment", HELP, HELP_FLAGS)
    app.run(
        main,
        flags_parser=functools.partial(config_lib.parse_command_line, prog="kd_keras.experiment"),
    )


if __name__ == "__main__":
    run_cli()
