"""Command line: `python -m kd_keras.evaluate` (console script `kd-evaluate`) evaluates a run, an export
or a teacher with kd_keras.eval.evaluation."""

import functools
import os
import sys

from absl import app, flags

from kd_keras import config as config_lib
from kd_keras.eval import evaluation

config_lib.define_evaluate_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kd_keras import cli

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
    app.run(main, flags_parser=functools.partial(config_lib.parse_command_line, prog=evaluation.PROG))


if __name__ == "__main__":
    run_cli()
