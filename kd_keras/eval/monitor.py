"""The k-NN monitor: a Keras callback measuring k-NN accuracy of the student during training."""

import json
import os

import keras
import tensorflow as tf

from kd_keras.artifacts import checkpointing

KNN_MONITOR_FILE = "knn_monitor.json"


class KNNMonitor(keras.callbacks.Callback):
    """Logs the k-NN accuracy of an embedding model every `every` epochs during training.

    After each `every`-th epoch (epoch numbers as Keras counts them, so a resumed run continues
    the same schedule), features of a bounded labelled memory and query set are extracted
    with `embed_model` (training=False) and classified with `kd_keras.eval.knn.knn_accuracy`
    (cosine, majority vote). Scalars go to TensorBoard under `logdir` (tags
    "knn_monitor/knn_top1_k{k}", step = epoch number, 1-based), and every measurement is
    appended to the JSON file `history_path` as {"epoch", "step", metrics...}, replacing an
    entry of the same epoch, so a resumed run keeps the curve of its earlier epochs.

    Args:
      embed_model: keras.Model images [B, H, W, 3] -> features [B, m] (the student backbone).
      train_dataset: tf.data of {"image" [B, H, W, 3], "label" [B]} batches, the k-NN memory
        (already bounded and transformed, e.g. centre crops).
      test_dataset: the same for the queries.
      every: epochs between measurements (>= 1).
      ks: neighbour counts; each must not exceed the memory size.
      logdir: TensorBoard directory of the monitor.
      history_path: JSON file holding the curve (None: not written).
    """

    def __init__(self, embed_model, train_dataset, test_dataset, every, ks, logdir, history_path):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.embed_model = embed_model
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.every = every
        self.ks = tuple(ks)
        self.logdir = logdir
        self.history_path = history_path
        self._writer = None

    def measure(self):
        """k-NN metrics of the current weights: {"knn_top1_k{k}": float, ...}."""
        from kd_keras.eval import features, knn

        xtr, ytr = features.extract_features(self.embed_model, self.train_dataset)
        xte, yte = features.extract_features(self.embed_model, self.test_dataset)
        ks = tuple(k for k in self.ks if k <= xtr.shape[0]) or (xtr.shape[0],)
        return knn.knn_accuracy(xtr, ytr, xte, yte, ks=ks, vote="majority")

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every:
            return
        metrics = self.measure()
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        with self._writer.as_default():
            for key, value in metrics.items():
                tf.summary.scalar(f"knn_monitor/{key}", value, step=done)
        self._writer.flush()
        if logs is not None:
            logs.update({f"knn_monitor_{k}": v for k, v in metrics.items()})
        if self.history_path:
            step = int(self.model.optimizer.iterations.numpy()) if self.model else None
            entries = [e for e in read_knn_history(self.history_path) if e["epoch"] != done]
            entries.append({"epoch": done, "step": step, **metrics})
            entries.sort(key=lambda e: e["epoch"])
            checkpointing.write_json(self.history_path, entries)


def read_knn_history(path):
    """The entries of a `KNNMonitor` history file, sorted by epoch ([] when it is absent)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        entries = json.load(f)
    return sorted(entries, key=lambda e: e["epoch"])
