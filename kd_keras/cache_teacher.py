"""Command line: `python -m kd_keras.cache_teacher` caches teacher features (kd_keras.training.cache)."""

import functools

from absl import app, flags

from kd_keras import cli
from kd_keras import config as config_lib
from kd_keras.training import cache

config_lib.define_cache_flags()


HELP = """Runs the teachers once over --cache_epochs of augmented views and stores their features in
--cache_dir, so that training with --teacher_cache=DIR does not run the teachers."""
HELP_FLAGS = (
    "teacher",
    "cache_dir",
    "cache_epochs",
    "dataset",
    "image_size",
    "method",
    "cache_batch_size",
    "flagfile",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_logging()
    with cli.one_line_errors("kd_keras.cache_teacher", (ValueError, FileNotFoundError)):
        cfg = config_lib.cache_config_from_flags(flags.FLAGS)
        cli.import_tensorflow_quietly()  # after the flags are checked: bad input is fast
        cache.run(cfg)


def run_cli():
    """Entry point of the `kd-cache-teacher` console script."""
    cli.exit_with_help_if_asked("kd_keras.cache_teacher", HELP, HELP_FLAGS)
    app.run(
        main,
        flags_parser=functools.partial(
            config_lib.parse_command_line, prog="kd_keras.cache_teacher"
        ),
    )


if __name__ == "__main__":
    run_cli()
