"""Command-line training: flags -> config -> strategy -> data -> method -> fit -> k-NN -> export.

  python -m kd_keras.train --flagfile=flags/simreg.cfg --workdir=/tmp/run

Re-running the same command after an interruption resumes from the last checkpoint; re-running a
finished run re-evaluates and re-exports without training again.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time

from absl import app, flags

from kd_keras import config as config_lib

config_lib.define_flags()

log = logging.getLogger("kd_keras")

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
EXPORT_DIR = "export"
RESULTS = "results.json"
DONE_MARKER = "DONE"


class UsageError(Exception):
    """Bad input from the user: reported as one line, without a traceback."""


def select_strategy(name, multi_worker_timeout=600.0):
    """Returns the tf.distribute strategy named by --strategy.

    multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG (see kd_keras.distributed), made
    once per process; it waits at most `multi_worker_timeout` seconds for the other workers.
    """
    import tensorflow as tf

    if name == "multi_worker":
        from kd_keras import distributed

        return distributed.multi_worker_strategy(multi_worker_timeout)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def learning_rate_schedule(optim, steps_per_epoch):
    """Cosine (or constant) schedule over all steps with optional linear warm-up."""
    import keras

    peak = optim.scaled_lr()
    total = optim.epochs * steps_per_epoch
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    if optim.schedule == "constant":
        return peak
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, total - warmup, warmup_target=peak, warmup_steps=warmup, alpha=0.0
        )
    return keras.optimizers.schedules.CosineDecay(peak, total, alpha=0.0)


def default_eval_split(dataset):
    if dataset.startswith("tfds:") or dataset == "digits":
        return "test"
    return "val"


def fit_from_step(method, data_from, done_steps, steps_per_epoch, epochs, **fit_kwargs):
    """Runs `method.fit` for the steps left after `done_steps`, exactly as an uninterrupted run.

    Keras counts progress in epochs. When a run was stopped inside an epoch, a first `fit`
    runs only the rest of that epoch (same fit epoch number, so logs, validation and epoch
    callbacks line up); a second one runs the remaining whole epochs.

    Args:
      method: a compiled keras.Model whose optimizer step is `done_steps`.
      data_from: function step -> the training data continuing at that optimizer step.
      done_steps, steps_per_epoch, epochs: progress so far and the run's length.
      **fit_kwargs: passed to every `fit` call (callbacks, validation_data, verbose, ...).

    Returns:
      dict name -> list of per-epoch values, as `History.history`, over both calls.
    """
    history = {}
    epoch, into_epoch = divmod(done_steps, steps_per_epoch)
    if into_epoch and epoch < epochs:
        part = method.fit(
            data_from(done_steps),
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=steps_per_epoch - into_epoch,
            **fit_kwargs,
        )
        history = dict(part.history)
        epoch += 1
    if epoch < epochs:
        rest = method.fit(
            data_from(epoch * steps_per_epoch),
            initial_epoch=epoch,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            **fit_kwargs,
        )
        for key, values in rest.history.items():
            history[key] = history.get(key, []) + list(values)
    return history


def build_student(cfg, input_size):
    from kd_keras import backbones

    return backbones.build_backbone(
        cfg.model.student,
        input_size,
        small_stem=cfg.model.small_stem,
        norm=cfg.model.student_norm,
        sync_bn=cfg.sync_bn,
        # SwAV / OSS feed crops of two sizes through the same network.
        any_input_size=cfg.method in config_lib.CLUSTERING_METHODS,
    )


def build_method(cfg, student, teachers, num_classes, steps_per_epoch=1, teacher_networks=None):
    """The keras.Model of --method around `student` (un-compiled)."""
    from kd_keras import heads, methods

    if cfg.method in config_lib.CLUSTERING_METHODS:
        from kd_keras.methods import factory

        return factory.build_clustering_method(cfg, student, steps_per_epoch, teacher_networks)
    if cfg.method == "supervised":
        return methods.Supervised(
            student, num_classes, weight_decay=cfg.optim.weight_decay, name="supervised"
        )
    m = student.output_shape[-1]
    head_list = [
        heads.prediction_head(
            m,
            t.feature_dim,
            cfg.model.head,
            hidden_dims=cfg.model.head_hidden_dims,
            sync_bn=cfg.sync_bn,
            name=f"head_{t.name}",
        )
        for t in teachers
    ]
    return methods.SimReg(
        student,
        teachers,
        head_list,
        variant=cfg.method,
        sync_bn=cfg.sync_bn,
        weight_decay=cfg.optim.weight_decay,
        name=cfg.method,
    )


def resolve_teachers(cfg, strategy):
    """Loads every --teacher, training recipe teachers first (cached under the workdir)."""
    from kd_keras import teachers as teachers_lib

    loaded = []
    for i, raw in enumerate(cfg.model.teachers):
        spec = teachers_lib.parse_teacher_spec(raw, i)
        if spec.kind == "recipe":
            run_dir = train_recipe_teacher(cfg, spec)
            spec = dataclasses.replace(spec, kind="run", path=run_dir)
        with strategy.scope():
            loaded.append(teachers_lib.load_teacher(spec, cfg.data.image_size, i, cfg.workdir))
        log.info(
            "teacher %s: %s (%s), %d-d features",
            spec.name,
            spec.path,
            spec.kind,
            loaded[-1].feature_dim,
        )
    return loaded


def open_teacher_caches(cfg, teachers, train_examples, train_info):
    """The `TeacherCache` of each teacher from --teacher_cache, in teacher order ([] if none).

    Every teacher needs exactly one cache, and each cache's manifest must match this run's
    dataset, views, seed and teacher (see `teacher_cache.check_manifest`).
    """
    from kd_keras import teacher_cache

    if not cfg.model.teacher_caches:
        return []
    paths = teacher_cache.expand_cache_dirs(cfg.model.teacher_caches)
    by_name = {}
    for path in paths:
        cache = teacher_cache.TeacherCache(path)
        if cache.name in by_name:
            raise UsageError(
                f"--teacher_cache: {by_name[cache.name].path} and {path} both cache teacher "
                f"{cache.name!r}."
            )
        by_name[cache.name] = cache
    names = [t.name for t in teachers]
    missing = [n for n in names if n not in by_name]
    extra = [n for n in by_name if n not in names]
    if missing or extra:
        raise UsageError(
            f"--teacher_cache must give one cache per --teacher: teachers {names}, caches "
            f"{sorted(by_name)} (no cache for {missing}, no teacher for {extra})."
        )
    caches = [by_name[n] for n in names]
    if len({c.epochs for c in caches}) > 1:
        raise UsageError(
            "--teacher_cache: the caches hold different numbers of epochs "
            f"{[c.epochs for c in caches]}; write them in one cache_teacher run."
        )
    dataset_id = teacher_cache.dataset_identity(train_examples, train_info)
    views_id = teacher_cache.view_identity(cfg.data, cfg.seed)
    for cache, teacher in zip(caches, teachers, strict=True):
        expected = {
            "teacher": teacher_cache.teacher_identity(teacher, cfg.data.image_size),
            "dataset": dataset_id,
            "views": views_id,
        }
        teacher_cache.check_manifest(cache.path, cache.manifest, expected)
        log.info(
            "teacher %s: features from cache %s (%d epochs)", cache.name, cache.path, cache.epochs
        )
    return caches


RECIPES = ("supervised",)
NAN_HINTS = {
    "default": "Try a lower --lr.",
    "clustering": "The embeddings or the Sinkhorn codes became non-finite; try a lower --lr, "
    "a larger --sinkhorn_epsilon or --freeze_prototypes_steps.",
}


def train_recipe_teacher(cfg, spec):
    """Trains (or reuses) the teacher named by `recipe:NAME` on the same data.

    The teacher run lives in `<workdir>/teacher_<recipe>`; a finished one (DONE marker) is
    reused, an interrupted one resumes.
    """
    if spec.recipe not in RECIPES:
        raise UsageError(f"--teacher=recipe:{spec.recipe}: unknown recipe; known: {RECIPES}.")
    run_dir = os.path.join(cfg.workdir, f"teacher_{spec.recipe}")
    if os.path.isfile(os.path.join(run_dir, DONE_MARKER)):
        log.info("reusing recipe teacher %s", run_dir)
        return run_dir
    teacher_cfg = dataclasses.replace(
        cfg,
        workdir=run_dir,
        method="supervised",
        export=True,
        model=dataclasses.replace(
            cfg.model, student=cfg.model.teacher_recipe_backbone, teachers=()
        ),
        optim=dataclasses.replace(
            cfg.optim,
            epochs=cfg.model.teacher_recipe_epochs,
            lr=cfg.model.teacher_recipe_lr,
            warmup_epochs=min(cfg.optim.warmup_epochs, cfg.model.teacher_recipe_epochs - 1),
        ),
    )
    print(
        f"Training recipe teacher '{spec.recipe}' ({teacher_cfg.model.student}, "
        f"{teacher_cfg.optim.epochs} epochs) in {run_dir}",
        flush=True,
    )
    run(teacher_cfg)
    return run_dir


def run(cfg, extra_callbacks=()):
    """Runs one training job described by `cfg`; returns the results dict."""
    return run_and_return_model(cfg, extra_callbacks)[0]


def run_and_return_model(cfg, extra_callbacks=()):
    """Like `run`, also returning the trained method (a keras.Model holding `.student`).

    The run holds its workdir's lock (worker k > 0: `worker_k/`) throughout, see
    kd_keras.runlock: a second run in the same workdir fails at once naming the holder.
    """
    from kd_keras import distributed, runlock

    # The strategy first: a multi-worker one must exist before TensorFlow runs any op.
    strategy = select_strategy(cfg.strategy, cfg.multi_worker_timeout)
    multi_worker = cfg.strategy == "multi_worker"
    role = distributed.worker_role(cfg.workdir, multi_worker, CHECKPOINT_DIR, LOG_DIR)
    with runlock.hold(os.path.dirname(role.checkpoint_dirs[0])):
        return _run_in_workdir(cfg, extra_callbacks, strategy, role)


def _run_in_workdir(cfg, extra_callbacks, strategy, role):
    """`run_and_return_model` once the strategy is made and the workdir is locked."""
    import keras

    from kd_keras import (
        augment,
        callbacks,
        checkpointing,
        data,
        distributed,
        export,
        precision,
        preemption,
        teacher_cache,
    )
    from kd_keras.eval import features, knn

    multi_worker = cfg.strategy == "multi_worker"
    os.makedirs(cfg.workdir, exist_ok=True)
    config_path = os.path.join(cfg.workdir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            previous = f.read().strip()
        if previous != cfg.to_json().strip():
            log.warning(
                "%s differs from this command's configuration; the new one is used and "
                "saved (resuming from the existing checkpoint).",
                config_path,
            )
    if role.is_chief:
        cfg.save(config_path)
    keras.utils.set_random_seed(cfg.seed)
    replicas = strategy.num_replicas_in_sync

    # Data.
    eval_split = cfg.data.eval_split or default_eval_split(cfg.data.dataset)
    load = dict(
        data_dir=cfg.data.data_dir, image_size_hint=cfg.data.image_size, download=cfg.data.download
    )
    train_examples, train_info = data.load_split(cfg.data.dataset, cfg.data.train_split, **load)
    data.check_batch_size(cfg.optim.batch_size, replicas, train_info.num_examples)
    if cfg.method == "supervised" and not train_info.has_labels:
        raise UsageError(f"--method=supervised needs labels; {cfg.data.dataset} has none.")
    steps_per_epoch = cfg.optim.steps_per_epoch or train_info.num_examples // cfg.optim.batch_size
    size = cfg.data.image_size

    clustering = cfg.method in config_lib.CLUSTERING_METHODS
    if clustering:
        from kd_keras.methods import factory
    distils = cfg.method not in ("supervised", *config_lib.CLUSTERING_METHODS)
    teachers = resolve_teachers(cfg, strategy) if distils else []
    caches = open_teacher_caches(cfg, teachers, train_examples, train_info)
    if cfg.op_determinism:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # process-wide, cannot be undone
    precision.warn_if_unsupported(cfg.precision)

    view_fn = augment.make_view_fn(
        cfg.data.augment, size, cfg.data.aug_mode, scale=(cfg.data.crop_scale_min, 1.0)
    )
    if cfg.data.aug_mode == "same" or caches:
        # One augmented image feeds both networks (or the teachers' features come from a
        # cache); don't carry a duplicate through tf.data.
        view_fn = view_fn.select(("student",))

    if clustering:
        view_fn = factory.multicrop_view_fn(cfg)  # {"large": [2, S, S, 3], "small": [V, s, s, 3]}

    # Where a resumed run picks up: the optimizer step of the newest checkpoint (in a
    # multi-worker run, the newest one every worker has) -> (data epoch, batches into it).
    # Fit epochs need not match data epochs (--steps_per_epoch), so the data position is
    # derived from the step count.
    data_steps = train_info.num_examples // cfg.optim.batch_size
    # Unreadable (truncated) checkpoints are renamed aside first, so the newest readable one wins.
    checkpointing.set_aside_unreadable(role.checkpoint_dirs[0])
    done_steps = distributed.resume_step(strategy, role.checkpoint_dirs)

    def train_data(step, num_shards=1, shard_index=0, shard_batch_size=None):
        """The training batches from optimizer step `step` on (one worker's share)."""
        start_epoch, skip_batches = divmod(step, data_steps)
        ds = data.make_train_dataset(
            train_examples,
            view_fn,
            cfg.optim.batch_size,
            seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            cache_decoded=cfg.data.cache_decoded,
            start_epoch=start_epoch,
            skip_batches=skip_batches,
            deterministic=cfg.data.deterministic,
            view_epochs=caches[0].epochs if caches else None,
            num_shards=num_shards,
            shard_index=shard_index,
            shard_batch_size=shard_batch_size,
        )
        if caches:
            ds = teacher_cache.attach_features(ds, caches)
        return ds

    def fit_data(step):
        if not multi_worker:
            return train_data(step)
        # Each worker builds only its share of every global batch (kd_keras.data sharding),
        # so no two workers see the same example in a step or an epoch.
        return strategy.distribute_datasets_from_function(
            lambda ctx: train_data(
                step,
                ctx.num_input_pipelines,
                ctx.input_pipeline_id,
                ctx.get_per_replica_batch_size(cfg.optim.batch_size),
            )
        )

    train_ds = train_data(done_steps)

    def eval_transform(image):
        return augment.center_crop(image, size)

    eval_info = None
    eval_examples = None
    try:
        eval_examples, eval_info = data.load_split(cfg.data.dataset, eval_split, **load)
    except (FileNotFoundError, ValueError) as err:
        if cfg.data.eval_split:  # asked for explicitly: its absence is an error
            raise
        log.warning("no evaluation split (%s), k-NN evaluation skipped: %s", eval_split, err)

    def eval_views(examples):
        ds = data.make_eval_dataset(examples, eval_transform, cfg.eval.eval_batch_size)
        return ds.map(lambda b: {"student": b["image"], "label": b["label"]})

    # Model. Re-seed here so the student's initialisation does not depend on whether a recipe
    # teacher was just trained in this process or reused from an earlier one.
    keras.utils.set_random_seed(cfg.seed)
    # Layers take the dtype policy they are built under; BN, losses and Sinkhorn stay float32.
    with strategy.scope(), precision.policy_scope(cfg.precision):
        student = build_student(cfg, size)
        teacher_networks = None
        if cfg.method == "oss_offline":
            teacher_networks = factory.load_clustering_networks(cfg.model.teachers[0], cfg)
        method = build_method(
            cfg, student, teachers, train_info.num_classes, steps_per_epoch, teacher_networks
        )
        if clustering:
            optimizer = factory.make_optimizer(cfg, steps_per_epoch)
        else:
            optimizer = keras.optimizers.SGD(
                learning_rate=learning_rate_schedule(cfg.optim, steps_per_epoch),
                momentum=cfg.optim.momentum,
            )
        jit_compile, why = precision.choose_jit_compile(cfg.jit_compile, size, clustering)
        log.info("XLA jit_compile=%s (%s)", jit_compile, why)
        method.compile(optimizer=optimizer, jit_compile=jit_compile)
        method.build((None, size, size, 3))
        checkpointing.restore(method, role.checkpoint_dirs, done_steps)

    logdir = role.logdir
    cbs = [
        callbacks.NaNGuard(
            hint=NAN_HINTS["clustering" if clustering else "default"],
            checkpoint_dir=role.checkpoint_dirs[0],
        ),
        # Every worker saves (its own copy); resuming restarts at the exact optimizer step.
        checkpointing.StepCheckpoint(role.checkpoint_dirs[0], save_freq=cfg.save_freq),
        # After StepCheckpoint: SIGTERM/SIGINT save the step just finished, then stop the run.
        preemption.PreemptionGuard(
            role.checkpoint_dirs[0],
            agree_every=cfg.save_freq if isinstance(cfg.save_freq, int) else None,
        ),
        keras.callbacks.TensorBoard(logdir, update_freq="epoch"),
        *extra_callbacks,
    ]
    if cfg.log_images and role.is_chief:
        first = next(iter(train_ds.take(1)))
        views = {k: v for k, v in first.items() if k in ("student", "teacher")}
        # Multi-crop: the first crop of each resolution group.
        views.update({k: v[:, 0] for k, v in first.items() if k in ("large", "small")})
        cbs.append(callbacks.ViewImageLogger(logdir, views, cfg.log_images))
    if cfg.eval.knn_monitor_every and role.is_chief:
        monitor = _knn_monitor(cfg, student, train_examples, train_info, eval_examples, eval_info)
        if monitor is not None:
            cbs.append(monitor)

    # Per-epoch validation: MSE/cosine to each teacher (distillation) or accuracy (supervised).
    validation = None
    if clustering:
        # Before TensorBoard, so that the epoch logs it writes include collapse_warning.
        cbs.insert(1, factory.CollapseWarning(factory.uniform_loss(cfg)))
    elif eval_examples is not None and (cfg.method != "supervised" or eval_info.has_labels):
        validation = eval_views(eval_examples)

    t0 = time.time()
    history = fit_from_step(
        method,
        fit_data,
        done_steps,
        steps_per_epoch,
        cfg.optim.epochs,
        validation_data=validation,
        callbacks=cbs,
        verbose=cfg.verbose,
    )
    train_seconds = time.time() - t0
    last_logs = {k: float(v[-1]) for k, v in history.items() if v}
    if not last_logs:  # nothing left to train (a re-run after a kill in the final phase)
        last_logs = checkpointing.last_logs(role.checkpoint_dirs[0])

    results = {
        "method": cfg.method,
        "student": cfg.model.student,
        "teachers": [t.name for t in teachers],
        "dataset": cfg.data.dataset,
        "train_split": cfg.data.train_split,
        "eval_split": eval_split if eval_info else None,
        # Undecodable train images, found once when the split was loaded and left out.
        "skipped_train_files": {
            "count": train_info.skipped_files,
            "first": list(train_info.skipped_names),
        },
        "epochs": cfg.optim.epochs,
        "steps": int(method.optimizer.iterations.numpy()),
        "final_learning_rate": float(method.optimizer.learning_rate.numpy()),
        "train_seconds_this_invocation": round(train_seconds, 1),
        "final_logs": last_logs,
    }

    # k-NN evaluation: backbone features, cosine, majority vote (SimReg protocol).
    # Only the chief evaluates, exports and writes results; the others wait at the end.
    evaluate = cfg.evaluate and role.is_chief and eval_info is not None
    if evaluate and train_info.has_labels and eval_info.has_labels:
        memory = train_examples
        cap = cfg.eval.knn_max_train
        if cap and cap < train_info.num_examples:
            # Files are ordered by class: take every stride-th example, not the first `cap`,
            # so that the k-NN memory covers every class.
            stride = -(-train_info.num_examples // cap)
            memory = train_examples.filter(lambda ex: ex["index"] % stride == 0)
        train_eval = data.make_eval_dataset(memory, eval_transform, cfg.eval.eval_batch_size)
        test_eval = data.make_eval_dataset(eval_examples, eval_transform, cfg.eval.eval_batch_size)
        ks = tuple(
            k for k in cfg.eval.knn_k if k <= (cfg.eval.knn_max_train or train_info.num_examples)
        )

        def knn_of(embed):
            xtr, ytr = features.extract_features(embed, train_eval)
            xte, yte = features.extract_features(embed, test_eval)
            return knn.knn_accuracy(xtr, ytr, xte, yte, ks=ks, vote="majority")

        knn_results = {
            "protocol": "knn cosine majority vote, backbone features, centre crop",
            "student": knn_of(student),
        }
        for t in teachers:
            knn_results[f"teacher_{t.name}"] = knn_of(t)
        if cfg.method in ("oss", "oss_offline"):
            knn_results["teacher"] = knn_of(method.teacher_backbone)
        if cfg.method != "supervised":
            # Only the chief gets here: under a multi-worker strategy, creating variables in
            # its scope would start a broadcast that the other workers never join.
            with strategy.scope() if not multi_worker else contextlib.nullcontext():
                keras.utils.set_random_seed(cfg.seed + 1)
                random_student = build_student(cfg, size)
            knn_results["random_init_student"] = knn_of(random_student)
        results["knn"] = knn_results
        _log_knn_to_tensorboard(
            os.path.join(cfg.workdir, LOG_DIR, "knn"), knn_results, results["steps"]
        )
        results["num_train"] = train_info.num_examples
        results["num_eval"] = eval_info.num_examples

    if cfg.export and role.is_chief:
        exported, exported_name = student, cfg.model.student
        if clustering:
            exported, exported_name = factory.exported_backbone(cfg, method)
            results["networks"] = factory.export_clustering_networks(cfg, method, cfg.workdir)
        path = export.export_backbone(
            exported,
            os.path.join(cfg.workdir, EXPORT_DIR),
            metadata={"backbone": exported_name, "method": cfg.method, "image_size": size},
            heads=getattr(method, "heads", None),
        )
        results["export"] = path
    if role.is_chief:
        _write_json(os.path.join(cfg.workdir, RESULTS), results)
        checkpointing.write_atomic(os.path.join(cfg.workdir, DONE_MARKER), "done\n")
        _print_summary(results)
    role.finish(strategy)
    return results, method


def _knn_monitor(cfg, student, train_examples, train_info, eval_examples, eval_info):
    """The `KNNMonitor` of --knn_monitor_every, or None when the data has no labelled eval split.

    Both sets are bounded by taking every n-th example (files are ordered by class, so the
    first n would miss classes) and use the centre-crop evaluation transform.
    """
    from kd_keras import augment, callbacks, data
    from kd_keras.eval import features

    if eval_examples is None or not (train_info.has_labels and eval_info.has_labels):
        log.warning("--knn_monitor_every needs labelled train and eval splits; monitor off.")
        return None

    def bounded(examples, num, cap):
        stride = -(-num // cap)
        if stride > 1:
            examples = features.select_examples(examples, lambda ex: ex["index"] % stride == 0)
        ds = data.make_eval_dataset(
            examples, lambda im: augment.center_crop(im, cfg.data.image_size), 256
        )
        return ds.map(lambda b: {"image": b["image"], "label": b["label"]})

    return callbacks.KNNMonitor(
        student,
        bounded(train_examples, train_info.num_examples, cfg.eval.knn_monitor_max_train),
        bounded(eval_examples, eval_info.num_examples, cfg.eval.knn_monitor_max_test),
        every=cfg.eval.knn_monitor_every,
        ks=cfg.eval.knn_k,
        logdir=os.path.join(cfg.workdir, LOG_DIR, "knn_monitor"),
        history_path=os.path.join(cfg.workdir, callbacks.KNN_MONITOR_FILE),
    )


def _log_knn_to_tensorboard(logdir, knn_results, step):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for who, metrics in knn_results.items():
            if isinstance(metrics, dict):
                for key, value in metrics.items():
                    tf.summary.scalar(f"{who}/{key}", value, step=step)
    writer.flush()


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _print_summary(results):
    print(f"\n== {results['method']} | student {results['student']} | {results['steps']} steps ==")
    for name, metrics in results.get("knn", {}).items():
        if name == "protocol":
            continue
        shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"k-NN {name:>24}: {shown}")
    if "export" in results:
        print(f"exported student backbone: {results['export']}")
    sys.stdout.flush()


def _run_worker(cfg):
    """`run(cfg)`; in a multi-worker run a peer's failure restarts this process (see
    kd_keras.distributed.restart_after_peer_failure) instead of ending it."""
    try:
        run(cfg)
    except Exception as err:
        if cfg.strategy == "multi_worker":
            from kd_keras import distributed

            if distributed.is_peer_failure(err):
                distributed.restart_after_peer_failure(err, cfg.worker_restarts)
        raise


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kd_keras import cli
    from kd_keras.callbacks import NonFiniteLoss
    from kd_keras.runlock import WorkdirError

    cli.quiet_logging()
    from kd_keras.checkpointing import CheckpointWriteError
    from kd_keras.preemption import Preempted

    errors = (
        UsageError, ValueError, FileNotFoundError, NonFiniteLoss, TimeoutError,
        CheckpointWriteError, WorkdirError,
    )
    with cli.one_line_errors("kd_keras.train", errors):
        try:
            _run_worker(config_lib.config_from_flags(flags.FLAGS))
        except Preempted as stop:
            print(f"kd_keras.train: {stop}", file=sys.stderr, flush=True)
            sys.exit(Preempted.EXIT_CODE)


if __name__ == "__main__":
    app.run(
        main, flags_parser=functools.partial(config_lib.parse_command_line, prog="kd_keras.train")
    )
