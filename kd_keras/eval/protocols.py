"""The evaluation protocols of `--protocols`, one function each, behind the `PROTOCOLS` table.

  knn        cosine k-NN, `--knn_votes` majority (SimReg/CompRess) and/or weighted (DINO),
             every k of `--knn_k`; top-1, and top-5 when there are more than 5 classes.
  linear     a linear probe (`kd_keras.eval.linear_probe`), preset `--linear_preset`, on cached
             centre-crop features (`--linear_path=cached`) or augmented images
             (`--linear_path=augmented`).
  finetune1, finetune10
             fine-tuning of the whole backbone on 1% / 10% of the training labels
             (`kd_keras.eval.finetune`; the label subset is saved next to the results).
  transfer   SimReg B.4's L-BFGS logistic regression on the frozen features of another
             dataset (`--transfer_data`; `kd_keras.eval.transfer`, docs/transfer.md).
  mse_cos    the SimReg loss between the student's prediction head and its teacher
             (mean ||p/|p| - t/|t|||^2 = 2 - 2 cos) and their mean cosine similarity, on the
             evaluation split; teachers come from the run's config.json.

A protocol is a function (EvalData, name) -> (details, records): `details` goes into
results.json under the protocol's name, `records` is a list of {"protocol", "metric", "value",
settings...} rows (the caller adds the layer and split names).
"""

import dataclasses
import os

from kd_keras.eval import EvaluationError
from kd_keras.eval import features as features_lib


@dataclasses.dataclass
class EvalData:
    """What every protocol reads, prepared once by `kd_keras.eval.evaluation.evaluate`.

    Attributes:
      loaded: the `LoadedModel` evaluated.
      cfg: `kd_keras.config.EvaluateConfig`.
      embed: embedding function of `cfg.eval_layer` (images [B, S, S, 3] -> [B, D]).
      layer_info: {"layer", "feature_dim", "pooling"} of `embed`.
      size: image side S.
      eval_dir: output directory (label subsets are written there).
      train_examples, train_info: the whole training split (examples, SplitInfo).
      eval_info: SplitInfo of the evaluation split.
      test_ds: batched centre crops of the (bounded, `--eval_max_test`) evaluation split.
      train_eval_ds: batched centre crops of the training examples whose features are
        extracted (bounded by `--knn_max_train` when no linear probe needs them all).
    """

    loaded: object
    cfg: object
    embed: object
    layer_info: dict
    size: int
    eval_dir: str
    train_examples: object
    train_info: object
    eval_info: object
    test_ds: object
    train_eval_ds: object
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self):
        return max(self.train_info.num_classes, self.eval_info.num_classes)

    def features(self, which):
        """(features float32 [N, D], labels int64 [N]) of "train" or "test", extracted once."""
        if which not in self._cache:
            ds = self.train_eval_ds if which == "train" else self.test_ds
            x, y = features_lib.extract_features(self.embed, ds)
            if x.shape[1] != self.layer_info["feature_dim"]:
                raise EvaluationError(
                    f"the model returned {x.shape[1]}-d features for layer "
                    f"{self.layer_info['layer']} but declares {self.layer_info['feature_dim']}."
                )
            self._cache[which] = (x, y)
        return self._cache[which]


def record(protocol, metric, value, **settings):
    """One results row, or None when the metric does not exist (e.g. top-5 with <= 5 classes)."""
    if value is None:
        return None
    return {"protocol": protocol, "metric": metric, "value": float(value), **settings}


# --------------------------------------------------------------------------------------------
# k-NN.


def knn_memory_size(num_train, cfg):
    """Rows of the k-NN memory: every n-th of `num_train` training examples, at most
    `cfg.knn_max_train`."""
    return features_lib.every_nth_count(num_train, cfg.knn_max_train)


def check_knn(cfg, train_info):
    """Rejects a `--knn_k` above the memory size before any feature is extracted."""
    _check_ks(cfg.knn_k, knn_memory_size(train_info.num_examples, cfg))


def _check_ks(ks, memory_size):
    too_big = [k for k in ks if k > memory_size]
    if too_big:
        raise EvaluationError(
            f"--knn_k={','.join(map(str, too_big))} exceeds the {memory_size} training "
            "examples of the k-NN memory."
        )


def knn_scores(memory, memory_labels, x_test, y_test, ks, votes, num_classes, temperature):
    """{vote: `kd_keras.eval.knn.knn_accuracy` dict} for each vote of `votes`.

    Args:
      memory: float [N, D] training features; memory_labels: int [N].
      x_test: float [M, D]; y_test: int [M].
      ks: neighbour counts; votes: subset of `knn.VOTES`; num_classes: C (or None);
      temperature: of the weighted vote.
    """
    from kd_keras.eval import knn

    return {
        vote: knn.knn_accuracy(
            memory,
            memory_labels,
            x_test,
            y_test,
            ks=ks,
            vote=vote,
            num_classes=num_classes,
            temperature=temperature,
        )
        for vote in votes
    }


def knn_of_embedding(embed, memory_ds, test_ds, ks, vote="majority", num_classes=None,
                     temperature=0.07):
    """k-NN accuracy of an embedding function: the knn protocol on two labelled datasets.

    For training's final evaluation (and any caller with datasets at hand).

    Args:
      embed: images float32 [B, S, S, 3] -> features [B, D] (keras.Model, Teacher, function).
      memory_ds, test_ds: batched tf.data of {"image" [B, S, S, 3], "label" [B]}.
      ks: neighbour counts, each <= the memory size; vote: "majority" or "weighted".
    Returns:
      the `kd_keras.eval.knn.knn_accuracy` dict ("knn_top1_k{k}", "knn_top5_k{k}").
    """
    memory, memory_labels = features_lib.extract_features(embed, memory_ds)
    x_test, y_test = features_lib.extract_features(embed, test_ds)
    scores = knn_scores(
        memory, memory_labels, x_test, y_test, ks, (vote,), num_classes, temperature
    )
    return scores[vote]


def run_knn(data, name="knn"):
    """The knn protocol: every vote of `--knn_votes`, every k of `--knn_k`."""
    cfg = data.cfg
    x_train, y_train = data.features("train")
    x_test, y_test = data.features("test")
    rows = features_lib.every_nth_indices(len(y_train), cfg.knn_max_train)
    _check_ks(cfg.knn_k, len(rows))
    details = knn_scores(
        x_train[rows],
        y_train[rows],
        x_test,
        y_test,
        cfg.knn_k,
        cfg.knn_votes,
        data.num_classes,
        cfg.knn_temperature,
    )
    records = []
    for vote, accuracy in details.items():
        for k in cfg.knn_k:
            extra = dict(
                k=k, vote=vote, num_train=len(rows), num_test=len(y_test), similarity="cosine"
            )
            if vote == "weighted":
                extra["temperature"] = cfg.knn_temperature
            records.append(record(name, "top1", accuracy[f"knn_top1_k{k}"], **extra))
            records.append(record(name, "top5", accuracy.get(f"knn_top5_k{k}"), **extra))
    return details, records


# --------------------------------------------------------------------------------------------
# Linear probe.


def run_linear(data, name="linear"):
    """The linear protocol on cached centre-crop features or augmented images."""
    from kd_keras.eval import linear_probe

    cfg = data.cfg
    x_train, y_train = data.features("train")
    x_test, y_test = data.features("test")
    if cfg.linear_path == "cached":
        details = linear_probe.train_linear_probe(
            x_train,
            y_train,
            x_test,
            y_test,
            preset=cfg.linear_preset,
            epochs=cfg.linear_epochs,
            seed=cfg.seed,
        )
    else:
        details = _linear_augmented(data, linear_probe, x_train, x_test, y_test)
    settings = {k: details[k] for k in ("preset", "path", "epochs", "num_train", "num_test")}
    records = [record(name, metric, details[metric], **settings) for metric in ("top1", "top5")]
    return details, records


def _linear_augmented(data, linear_probe, x_train, x_test, y_test):
    from kd_keras.eval import layers

    cfg = data.cfg
    embed_model, _ = layers.layer_embedding(layers.keras_only(data.loaded), cfg.eval_layer)
    num_train = data.train_info.num_examples
    train_examples, cache_note = features_lib.cached_training_images(
        data.train_examples, num_train, data.size
    )
    details = linear_probe.train_linear_probe_augmented(
        embed_model,
        train_examples,
        num_train,
        x_train,
        x_test,
        y_test,
        data.num_classes,
        preset=cfg.linear_preset,
        image_size=data.size,
        epochs=cfg.linear_epochs,
        seed=cfg.seed,
    )
    details["training_images"] = cache_note or "decoded from the dataset every epoch"
    return details


# --------------------------------------------------------------------------------------------
# Fine-tuning on a label subset.


def run_finetune(data, name):
    """finetune1 / finetune10: the whole backbone on a class-balanced label subset."""
    details = _finetune(data, name)
    settings = {
        k: details[k] for k in ("fraction", "subset_file", "epochs", "num_train", "num_test")
    }
    records = [
        record(name, metric, details[metric], **settings, layer="backbone")
        for metric in ("top1", "top5")
    ]
    return details, records


def _finetune(data, name):
    import numpy as np
    import tensorflow as tf

    from kd_keras.eval import finetune, subsets

    cfg = data.cfg
    preset = finetune.PRESETS[name]
    labels = features_lib.label_array(data.train_examples, data.train_info.num_examples)
    indices = subsets.label_subset(labels, preset.fraction, seed=cfg.seed)
    subset_file = os.path.join(data.eval_dir, f"subset_{name}_seed{cfg.seed}.json")
    subsets.save_subset(subset_file, indices, labels, preset.fraction, cfg.seed)
    keep = np.zeros(len(labels), bool)
    keep[indices] = True
    keep_t = tf.constant(keep)
    chosen = features_lib.select_examples(
        data.train_examples, lambda ex: tf.gather(keep_t, ex["index"])
    )
    chosen, cache_note = features_lib.cached_training_images(chosen, len(indices), data.size)
    # The same test examples as the other protocols (every n-th with --eval_max_test).
    details = finetune.finetune(
        data.loaded.backbone,
        chosen,
        len(indices),
        data.test_ds,
        num_classes=data.num_classes,
        preset=preset,
        image_size=data.size,
        epochs=cfg.finetune_epochs,
        batch_size=cfg.finetune_batch_size,
        seed=cfg.seed,
    )
    details.update(fraction=preset.fraction, subset_file=subset_file, subset_seed=cfg.seed)
    details["training_images"] = cache_note or "decoded from the dataset every epoch"
    return details


# --------------------------------------------------------------------------------------------
# Prediction head vs teacher.

MSE_COS_DEFINITION = "mse = mean ||p/|p| - t/|t|||^2 (SimReg loss), cos = mean cos(p, t)"


def run_mse_cos(data, name="mse_cos"):
    """Per teacher of the run: the SimReg loss and cosine of its head's output vs the teacher."""
    from kd_keras.eval import loading

    loaded = data.loaded
    if not loaded.run_dir:
        raise EvaluationError("--protocols=mse_cos needs a run directory (teachers come from it).")
    details, records = {}, []
    for teacher in loading.load_run_teachers(loaded.run_dir, data.size):
        head_name = f"head_{teacher.name}"
        if head_name not in loaded.heads:
            raise EvaluationError(
                f"--protocols=mse_cos: no head {head_name!r} for teacher {teacher.name!r} "
                f"(heads: {sorted(loaded.heads)})."
            )
        values = head_teacher_agreement(
            loaded.backbone, loaded.heads[head_name], teacher, data.test_ds
        )
        details[teacher.name] = {**values, "definition": MSE_COS_DEFINITION}
        for metric in ("mse", "cos"):
            records.append(
                record(
                    name,
                    metric,
                    values[metric],
                    teacher=teacher.name,
                    num_test=values["num_test"],
                    layer=head_name,
                )
            )
    return details, records


def head_teacher_agreement(backbone, head, teacher, dataset):
    """{"mse", "cos", "num_test"}: `losses.simreg_loss` and mean cosine of head(backbone(x))
    against teacher(x), averaged over every image of `dataset` (batches of {"image"})."""
    import tensorflow as tf

    from kd_keras import losses

    @tf.function(reduce_retracing=True)
    def batch_sums(images):
        prediction = head(backbone(images, training=False), training=False)
        target = teacher(images)
        count = tf.cast(tf.shape(images)[0], tf.float32)
        # simreg_loss is a batch mean: times the batch size, batches of any size add up.
        loss_sum = losses.simreg_loss(prediction, target) * count
        return loss_sum, tf.reduce_sum(losses.cosine_similarity(prediction, target)), count

    loss_total = cos_total = count_total = 0.0
    for batch in dataset:
        loss_sum, cos_sum, count = batch_sums(batch["image"])
        loss_total += float(loss_sum)
        cos_total += float(cos_sum)
        count_total += float(count)
    if not count_total:
        raise EvaluationError("--protocols=mse_cos: the evaluation split is empty.")
    return {
        "mse": loss_total / count_total,
        "cos": cos_total / count_total,
        "num_test": int(count_total),
    }


# --------------------------------------------------------------------------------------------
# Transfer to another dataset.


def run_transfer(data, name="transfer"):
    """SimReg B.4's transfer protocol on `--transfer_data` (`kd_keras.eval.transfer`)."""
    from kd_keras.eval import transfer

    return transfer.run_protocol(data, name)


# --------------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One entry of `PROTOCOLS`.

    Attributes:
      run: fn(EvalData, name) -> (details dict, list of records).
      needs_labels: labelled train and evaluation splits.
      needs_keras: a Keras backbone (a bare SavedModel is not enough).
      needs_heads: the run's prediction heads.
      check: fn(cfg, train_info) raising EvaluationError, run before any feature extraction.
    """

    run: object
    needs_labels: bool = True
    needs_keras: bool = False
    needs_heads: bool = False
    check: object = None


PROTOCOLS = {
    "knn": Protocol(run_knn, check=check_knn),
    "linear": Protocol(run_linear),
    "finetune1": Protocol(run_finetune, needs_keras=True),
    "finetune10": Protocol(run_finetune, needs_keras=True),
    "mse_cos": Protocol(run_mse_cos, needs_labels=False, needs_keras=True, needs_heads=True),
    # Labels of --transfer_data, not of --dataset: checked by the protocol itself.
    "transfer": Protocol(run_transfer, needs_labels=False),
}


def check_protocols(names):
    """The protocols of `names` in table order; EvaluationError naming --protocols otherwise."""
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown:
        raise EvaluationError(f"--protocols: unknown {unknown}; choose from {tuple(PROTOCOLS)}.")
    return tuple(names)


def check_model(names, loaded, cfg):
    """Rejects protocols the model cannot serve (bare SavedModel, no heads) in one line."""
    needs_keras = [p for p in names if PROTOCOLS[p].needs_keras]
    if cfg.linear_path == "augmented" and "linear" in names:
        needs_keras.append("linear (augmented)")
    if needs_keras and loaded.backbone is None:
        raise EvaluationError(
            f"--protocols {needs_keras} need a Keras backbone; {loaded.source} is a bare "
            "SavedModel (use an export directory or run directory)."
        )
    needs_heads = [p for p in names if PROTOCOLS[p].needs_heads]
    if needs_heads and not loaded.heads:
        raise EvaluationError(
            f"--protocols={','.join(needs_heads)} needs the prediction heads; {loaded.source} "
            "has none (evaluate the run directory of a distillation run)."
        )


def check_data(names, cfg, dataset, train_info, eval_info):
    """Rejects protocols the splits cannot serve (no labels, k above the memory size)."""
    supervised = [p for p in names if PROTOCOLS[p].needs_labels]
    for info in (train_info, eval_info):
        if supervised and not info.has_labels:
            raise EvaluationError(
                f"--protocols {supervised} need labels, but split '{info.split}' of "
                f"{dataset} has none."
            )
    for name in names:
        if PROTOCOLS[name].check is not None:
            PROTOCOLS[name].check(cfg, train_info)
