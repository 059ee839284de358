"""Command line: `python -m kd_keras.evaluate` (console script `kd-evaluate`) evaluates a run, an export
or a teacher with kd_keras.eval.evaluation."""

import functools
import os
import sys

from absl import app, flags

from kd_keras import cli

# TensorFlow loads with the modules below: silence its import banners first.
cli.import_tensorflow_quietly()
from kd_keras import config as config_lib  # noqa: E402
from kd_keras.eval import evaluation  # noqa: E402

config_lib.define_evaluate_flags()


HELP = """Evaluates a trained network (a run directory, an export, a .keras file or a teacher spec):
k-NN and the other --protocols; prints a table and writes results.json under --eval_dir."""
HELP_FLAGS = (
    "model",
    "protocols",
    "dataset",
    "image_size",
    "knn_k",
    "eval_dir",
    "from_checkpoint",
    "eval_batch_size",
    "eval_layer",
    "transfer_data",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_logging()
    errors = (evaluation.EvaluationError, ValueError, FileNotFoundError)
    with cli.one_line_errors(evaluation.PROG, errors, first_line=True):
        cfg = config_lib.evaluate_config_from_flags(flags.FLAGS)
        loaded = evaluation.load_model(cfg.model, from_checkpoint=cfg.from_checkpoint)
        results = evaluation.evaluate(loaded, cfg)
    print(evaluation.format_table(results))
    print(f"results: {os.path.join(results['eval_dir'], evaluation.RESULTS)}")
    if "knn_monitor_plot" in results:
        print(f"k-NN monitor plot: {results['knn_monitor_plot']}")
    sys.stdout.flush()


def run_cli():
    """Entry point of the `kd-evaluate` console script."""
    cli.exit_with_help_if_asked("kd_keras.evaluate", HELP, HELP_FLAGS)
    app.run(
        main, flags_parser=functools.partial(config_lib.parse_command_line, prog=evaluation.PROG)
    )


if __name__ == "__main__":
    run_cli()
