"""Command line: `python -m kd_keras.cache_teacher` caches teacher features (kd_keras.training.cache)."""

import functools

from absl import app, flags

from kd_keras import config as config_lib
from kd_keras.training import cache

config_lib.define_cache_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kd_keras import cli

    cli.quiet_logging()
    with cli.one_line_errors("kd_keras.cache_teacher", (ValueError, FileNotFoundError)):
        cache.run(config_lib.cache_config_from_flags(flags.FLAGS))


def run_cli():
    """Entry point of the `kd-cache-teacher` console script."""
    app.run(
        main,
        flags_parser=functools.partial(
            config_lib.parse_command_line, prog="kd_keras.cache_teacher"
        ),
    )


if __name__ == "__main__":
    run_cli()
