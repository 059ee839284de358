"""Command line: `python -m kd_keras.launch` (console script `kd-launch`) starts local multi-worker training
(kd_keras.training.launcher)."""

import functools
import sys

from absl import app, flags

from kd_keras import cli
from kd_keras import config as config_lib
from kd_keras.training import launcher

config_lib.define_launch_flags()


HELP = """Starts --num_workers local worker processes of a multi-worker kd_keras.train run (the
remaining flags are passed to every worker) and restarts failed workers."""
HELP_FLAGS = ("num_workers", "host", "ports", "max_restarts")


def main(argv):
    try:
        cfg = config_lib.launch_config_from_flags(flags.FLAGS)
    except ValueError as err:
        print(f"kd_keras.launch: error: {err}", file=sys.stderr)
        sys.exit(launcher.USAGE_ERROR)
    train_args = argv[1:]
    if any(a.startswith("--strategy") for a in train_args):
        print("kd_keras.launch: error: --strategy is set by the launcher.", file=sys.stderr)
        sys.exit(launcher.USAGE_ERROR)
    ports = cfg.ports or launcher.free_ports(cfg.host, cfg.num_workers)
    addresses = [f"{cfg.host}:{p}" for p in ports]
    sys.exit(launcher.Launch(train_args, addresses, cfg.max_restarts).run())


def run_cli():
    """Entry point of the `kd-launch` console script."""
    cli.exit_with_help_if_asked("kd_keras.launch", HELP, HELP_FLAGS)
    app.run(
        main, flags_parser=functools.partial(config_lib.parse_command_line, prog="kd_keras.launch")
    )


if __name__ == "__main__":
    run_cli()
