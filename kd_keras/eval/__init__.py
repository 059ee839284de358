"""Evaluation of a trained network on frozen features (`python -m kd_keras.evaluate`).

Modules:
  loading     what `--model` names -> `LoadedModel` (export, .keras, SavedModel, checkpoint)
  layers      `--eval_layer` -> an embedding function (backbone, stages, heads)
  protocols   the `PROTOCOLS` table: knn, linear, finetune1, finetune10, mse_cos, transfer
  report      results.json, TensorBoard scalars and projector, k-NN monitor plot, text table
  knn, linear_probe, finetune, subsets, features, transfer
              the protocols' numerics on features / images, label subsets, feature extraction
"""


class EvaluationError(ValueError):
    """Bad input to the evaluation: reported by the CLI as one line."""
