"""Evaluation of a trained network on frozen features (`python -m kd_keras.evaluate`).

Modules:
  loading     what `--model` names -> `LoadedModel` (export, .keras, SavedModel, checkpoint)
  layers      `--eval_layer` -> an embedding function (backbone, stages, heads)
  protocols   the `PROTOCOLS` table: knn, linear, finetune1, finetune10, mse_cos, transfer
  report      results.json, TensorBoard scalars and projector, k-NN monitor plot, text table
  knn, linear_probe, finetune, subsets, features, transfer
              the protocols' numerics on features / images, label subsets, feature extraction
  monitor     the k-NN monitor callback used during training
  evaluation  one evaluation of a loaded model (what `kd_keras.evaluate` runs)

It may import every package below it (data, nets, optim, teachers, methods, config,
artifacts) and never `training`: a run directory is read through `artifacts.layout`.
"""


class EvaluationError(ValueError):
    """Bad input to the evaluation: reported by the CLI as one line."""
