"""Command-line training: flags -> config -> strategy -> data -> method -> fit -> k-NN -> export.

  python -m kd_keras.train --flagfile=flags/simreg.cfg --workdir=/tmp/run

A run is the sequence of named steps in `_run_in_workdir` (prepare_run, load_data,
load_teachers, prepare_views, build_model, make_callbacks, fit, final_evaluation,
export_run), each filling in a `Run`. What differs between methods (views, builder,
teachers, callbacks, exported networks, extra k-NN entries, NaN hint) comes from the method
registry (kd_keras.methods.registry), never from branches on the method's name here.

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

log = logging.getLogger("kd_keras")

# The run directory's names (re-exported from kd_keras.artifacts.layout).
from kd_keras.artifacts.layout import (  # noqa: E402
    CHECKPOINT_DIR,
    DONE_MARKER,
    EXPORT_DIR,
    LOG_DIR,
    RESULTS,
    RUN_CONFIG,
)


class UsageError(Exception):
    """Bad input from the user: reported as one line, without a traceback."""


def select_strategy(name, multi_worker_timeout=600.0):
    """Returns the tf.distribute strategy named by --strategy.

    multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG (see kd_keras.distributed), made
    once per process; it waits at most `multi_worker_timeout` seconds for the other workers.
    """
    import tensorflow as tf

    if name == "multi_worker":
        from kd_keras.training import distributed

        return distributed.multi_worker_strategy(multi_worker_timeout)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


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
    # The data is a tf.data pipeline that shuffles itself; Keras warns at every fit
    # when told to shuffle it (its default).
    fit_kwargs.setdefault("shuffle", False)
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
    """The student backbone of `cfg` (see `registry.build_student`)."""
    from kd_keras.methods import registry

    return registry.build_student(cfg, input_size)


def build_method(cfg, student, teachers, num_classes, steps_per_epoch=1, teacher_networks=None):
    """The keras.Model of --method around `student` (un-compiled; see
    `registry.build_method`, which raises ValueError naming an unknown --method)."""
    from kd_keras.methods import registry

    return registry.build_method(
        cfg, student, teachers, num_classes, steps_per_epoch, frozen=teacher_networks
    )


def resolve_teachers(cfg, strategy):
    """Loads every --teacher, training recipe teachers first (cached under the workdir)."""
    from kd_keras.teachers import loading as teachers_lib

    loaded = []
    specs = [teachers_lib.parse_teacher_spec(raw, i) for i, raw in enumerate(cfg.model.teachers)]
    stages = sum(spec.kind == "recipe" for spec in specs) + 1
    stage = 0
    for i, spec in enumerate(specs):
        if spec.kind == "recipe":
            stage += 1
            run_dir = train_recipe_teacher(cfg, spec, f"{stage}/{stages}")
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
    if stages > 1:
        print(
            f"{stages}/{stages} distilling into the student {cfg.model.student} "
            f"({cfg.method}) in {cfg.workdir}",
            flush=True,
        )
    return loaded


def open_teacher_caches(cfg, teachers, train_examples, train_info):
    """The `TeacherCache` of each teacher from --teacher_cache, in teacher order ([] if none).

    Every teacher needs exactly one cache, and each cache's manifest must match this run's
    dataset, views, seed and teacher (see `teacher_cache.check_manifest`).
    """
    from kd_keras.data import teacher_cache

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


def train_recipe_teacher(cfg, spec, stage="1/2"):
    """Trains (or reuses) the teacher named by `recipe:NAME` on the same data.

    The teacher run lives in `<workdir>/teacher_<recipe>`; a finished one (DONE marker) is
    reused, an interrupted one resumes.
    """
    if spec.recipe not in RECIPES:
        raise UsageError(f"--teacher=recipe:{spec.recipe}: unknown recipe; known: {RECIPES}.")
    from kd_keras.teachers import loading as teachers_lib

    run_dir = teachers_lib.recipe_dir(cfg.workdir, spec.recipe)
    if os.path.isfile(os.path.join(run_dir, DONE_MARKER)):
        print(f"{stage} reusing the recipe teacher '{spec.recipe}' trained in {run_dir}", flush=True)
        return run_dir
    teacher_cfg = dataclasses.replace(
        cfg,
        workdir=run_dir,
        method="supervised",
        export=True,
        model=dataclasses.replace(
            cfg.model, student=cfg.model.teacher_recipe_backbone, teachers=(), teacher_caches=()
        ),
        # The recipe is SGD with the run's schedule down to 0, whatever the student uses.
        optim=dataclasses.replace(
            cfg.optim,
            epochs=cfg.model.teacher_recipe_epochs,
            lr=cfg.model.teacher_recipe_lr,
            warmup_epochs=min(cfg.optim.warmup_epochs, cfg.model.teacher_recipe_epochs - 1),
            optimizer="sgd",
            final_lr=0.0,
        ),
        method_options={},
    )
    print(
        f"{stage} training the recipe teacher '{spec.recipe}' ({teacher_cfg.model.student}, "
        f"{teacher_cfg.optim.epochs} epoch(s)) in {run_dir}",
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
    from kd_keras.methods import registry
    from kd_keras.training import distributed, runlock

    spec = registry.get(cfg.method)  # an unknown method fails here, before anything runs
    # The strategy first: a multi-worker one must exist before TensorFlow runs any op.
    strategy = select_strategy(cfg.strategy, cfg.multi_worker_timeout)
    multi_worker = cfg.strategy == "multi_worker"
    role = distributed.worker_role(cfg.workdir, multi_worker, CHECKPOINT_DIR, LOG_DIR)
    created = not os.path.exists(cfg.workdir)
    r = Run(cfg, spec, strategy, role)
    try:
        with runlock.hold(os.path.dirname(role.checkpoint_dirs[0])):
            return _run_in_workdir(r, extra_callbacks)
    except BaseException:
        # A run that fails before training starts (bad data, teacher, model) leaves no
        # workdir behind when it created it; one that trained keeps it to resume from.
        if created and not r.started and not multi_worker and not _has_checkpoints(cfg.workdir):
            import shutil

            shutil.rmtree(cfg.workdir, ignore_errors=True)
        raise


def _has_checkpoints(workdir):
    """Whether any checkpoint was written under `workdir` (e.g. by a recipe teacher's run)."""
    for dirpath, _, files in os.walk(workdir):
        if files and CHECKPOINT_DIR in dirpath.split(os.sep):
            return True
    return False


@dataclasses.dataclass
class Run:
    """The state one training run builds up, step by step (see `_run_in_workdir`)."""

    cfg: object
    spec: object  # registry.MethodSpec
    strategy: object
    role: object  # distributed.WorkerRole
    train_examples: object = None
    train_info: object = None
    eval_examples: object = None
    eval_info: object = None
    eval_split: str | None = None
    steps_per_epoch: int = 1
    teachers: tuple = ()
    caches: tuple = ()
    view_fn: object = None
    done_steps: int = 0
    config_changes: list = dataclasses.field(default_factory=list)
    # --momentum_form of the run that wrote the checkpoints (None: no earlier SGD run).
    saved_momentum_form: str | None = None
    student: object = None
    method: object = None
    started: bool = False  # training began: the workdir holds state worth keeping

    @property
    def multi_worker(self):
        return self.cfg.strategy == "multi_worker"

    @property
    def labelled_eval(self):
        return (
            self.eval_info is not None
            and self.train_info.has_labels
            and (self.eval_info.has_labels)
        )


def _run_in_workdir(r, extra_callbacks):
    """`run_and_return_model` once the strategy is made and the workdir is locked."""
    r.config_changes, r.saved_momentum_form = prepare_run(r.cfg, r.role)
    load_data(r)
    load_teachers(r)
    prepare_views(r)
    build_model(r)
    save_config(r)
    cbs = make_callbacks(r, extra_callbacks)
    t0 = time.time()
    r.started = True
    last_logs = fit(r, cbs)
    results = run_summary(r, last_logs, time.time() - t0)
    if r.cfg.evaluate and r.role.is_chief and r.eval_info is not None:
        results.update(final_evaluation(r, results["steps"]))
    if r.cfg.export and r.role.is_chief:
        results.update(_export_or_report(r))
    if r.role.is_chief:
        _write_results(r.cfg.workdir, results)
        _write_done_marker(r.cfg.workdir)
        _print_summary(results, r.cfg.workdir)
    r.role.finish(r.strategy)
    return results, r.method


def prepare_run(cfg, role):
    """Creates the workdir, compares config.json with an earlier one (warning which settings
    differ), seeds everything and applies the process-wide settings.

    Returns (the differing settings as "name: old -> new" strings, empty for a new run; the SGD
    momentum form the earlier config.json trained with: "keras" for runs from before
    --momentum_form existed, None when there was none or it used LARS). A new run's config.json
    is written here; a changed one only by `save_config`, once the checkpoint has been
    restored, so that a refused resume leaves the run's record intact.
    """
    import keras

    from kd_keras.training import precision

    os.makedirs(cfg.workdir, exist_ok=True)
    config_path = os.path.join(cfg.workdir, RUN_CONFIG)
    changes, saved_form = [], None
    if os.path.isfile(config_path):
        previous = _read_config(config_path)
        saved_form = _momentum_form_of(previous)
        changes = config_changes(previous, json.loads(cfg.to_json()))
        if changes:
            log.warning(
                "%s differs from this command's configuration (%s); the new one is used and "
                "saved once the checkpoint is restored.",
                config_path,
                "; ".join(changes),
            )
    elif role.is_chief:
        cfg.save(config_path)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.op_determinism:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # process-wide, cannot be undone
    precision.warn_if_unsupported(cfg.precision)
    return changes, saved_form


def save_config(r):
    """Writes config.json after a resume was accepted (see `prepare_run`)."""
    if r.role.is_chief and r.config_changes:
        r.cfg.save(os.path.join(r.cfg.workdir, RUN_CONFIG))


def _read_config(path):
    try:
        with open(path) as f:
            previous = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix or remove it.") from err
    if not isinstance(previous, dict):
        raise ValueError(f"{path}: not a kd_keras configuration (a JSON object expected).")
    return previous


def config_changes(previous, current):
    """The settings that differ between two configurations (nested dicts), as sorted
    "dotted.name: old -> new" strings."""
    old, new = _flatten(previous), _flatten(current)
    return [
        f"{name}: {_short(old.get(name, '(unset)'))} -> {_short(new.get(name, '(unset)'))}"
        for name in sorted(set(old) | set(new))
        if old.get(name, _MISSING) != new.get(name, _MISSING)
    ]


_MISSING = object()


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value, limit=60):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _momentum_form_of(previous):
    """The SGD momentum form a saved configuration (parsed config.json) trained with (see
    `prepare_run`)."""
    optim = previous.get("optim", {})
    if not isinstance(optim, dict) or optim.get("optimizer", "sgd") != "sgd":
        return None
    return optim.get("momentum_form", "keras")


def load_data(r):
    """Loads the training split (and the evaluation split, when there is one)."""
    from kd_keras.data import sources as data

    cfg = r.cfg
    r.eval_split = cfg.data.eval_split or data.default_eval_split(cfg.data.dataset)
    load = dict(
        data_dir=cfg.data.data_dir,
        image_size_hint=cfg.data.image_size,
        download=cfg.data.download,
        max_image_pixels=cfg.data.max_image_pixels,
    )
    r.train_examples, r.train_info = data.load_split(cfg.data.dataset, cfg.data.train_split, **load)
    data.check_batch_size(
        cfg.optim.batch_size, r.strategy.num_replicas_in_sync, r.train_info.num_examples
    )
    if r.spec.needs_labels and not r.train_info.has_labels:
        raise UsageError(f"--method={cfg.method} needs labels; {cfg.data.dataset} has none.")
    r.steps_per_epoch = cfg.optim.steps_per_epoch or (
        r.train_info.num_examples // cfg.optim.batch_size
    )
    try:
        r.eval_examples, r.eval_info = data.load_split(cfg.data.dataset, r.eval_split, **load)
    except (FileNotFoundError, ValueError) as err:
        if cfg.data.eval_split:  # asked for explicitly: its absence is an error
            raise
        log.warning("no evaluation split (%s), k-NN evaluation skipped: %s", r.eval_split, err)


def load_teachers(r):
    """The feature teachers of methods that distil them, and their --teacher_cache."""
    if r.spec.teacher_features:
        r.teachers = tuple(resolve_teachers(r.cfg, r.strategy))
    r.caches = tuple(open_teacher_caches(r.cfg, r.teachers, r.train_examples, r.train_info))


def prepare_views(r):
    """The view function of the method's view kind, and the step a resumed run starts at."""
    from kd_keras.artifacts import checkpointing
    from kd_keras.training import distributed

    r.view_fn = view_fn_for(r.cfg, r.spec, bool(r.caches))
    # Unreadable (truncated) checkpoints are renamed aside first, so the newest readable one wins.
    checkpointing.set_aside_unreadable(r.role.checkpoint_dirs[0])
    # Where a resumed run picks up: the optimizer step of the newest checkpoint (in a
    # multi-worker run, the newest one every worker has).
    r.done_steps = distributed.resume_step(r.strategy, r.role.checkpoint_dirs)
    if r.done_steps:
        check_resume_data(r)


def data_mapping(r):
    """What turns an optimizer step into (epoch, batch, examples, views): recorded with every
    checkpoint; a resume with any of it changed would silently train on other data."""
    cfg, d = r.cfg, r.cfg.data
    return {
        "global_batch_size": cfg.optim.batch_size,
        "steps_per_epoch": r.steps_per_epoch,
        "dataset": d.dataset,
        "train_split": d.train_split,
        "examples": r.train_info.num_examples,
        "listing_sha1": r.train_info.listing_hash,
        "seed": cfg.seed,
        "views": {
            "image_size": d.image_size,
            "augment": d.augment,
            "aug_mode": d.aug_mode,
            "crop_scale_min": d.crop_scale_min,
            "view_resize": d.view_resize,
            "strong_blur": d.strong_blur,
            "shuffle_buffer": d.shuffle_buffer,
            "method": cfg.method,
        },
    }


def check_resume_data(r):
    """Refuses to resume from a checkpoint whose recorded step <-> data mapping differs from
    this run's, naming each difference (a longer run, more --epochs, stays allowed)."""
    from kd_keras.artifacts import checkpointing

    total = r.cfg.optim.epochs * r.steps_per_epoch
    if r.done_steps > total:
        raise UsageError(
            f"--workdir={r.cfg.workdir}: its newest checkpoint is of step {r.done_steps}, beyond "
            f"this run's {total} steps ({r.cfg.optim.epochs} epochs of {r.steps_per_epoch}); "
            "it belongs to another (longer) run. Use another --workdir."
        )
    state = checkpointing.read_state(r.role.checkpoint_dirs[0]) or {}
    recorded = state.get("data")
    if isinstance(recorded, dict):  # recorded before --strong_blur: the paper's blur was the one
        recorded.setdefault("views", {}).setdefault("strong_blur", "paper")
    if r.done_steps not in state.get("files", {}):
        log.warning(
            "resuming at step %d from a checkpoint that checkpoint.json does not record (copied "
            "in?): its step <-> data mapping cannot be verified",
            r.done_steps,
        )
        return
    if not isinstance(recorded, dict):
        log.warning(
            "resuming at step %d: the checkpoint records no step <-> data mapping (written "
            "before kd_keras recorded it), so batch size, data and seed cannot be verified",
            r.done_steps,
        )
        return
    current = json.loads(json.dumps(data_mapping(r)))  # tuples -> lists, as recorded
    changes = config_changes(recorded, current)
    if changes:
        raise UsageError(
            f"--workdir={r.cfg.workdir}: its checkpoint of step {r.done_steps} was trained "
            f"with other data settings ({'; '.join(changes)}); resuming would silently "
            "reinterpret its steps. Use the original settings or another --workdir."
        )
    log.info("resuming at step %d with the recorded data mapping", r.done_steps)


def view_fn_for(cfg, spec, cached_teachers=False):
    """The training views of `spec.views`.

    single: one augmented view "student"; pair: "student" and "teacher", one image for both
    with --aug_mode=same or when the teachers' features come from a cache (no duplicate is
    carried through tf.data then); multicrop: {"large": [2, S, S, 3], "small": [V, s, s, 3]}.
    """
    from kd_keras.data import augment

    if spec.multicrop:
        from kd_keras.methods import factory

        return factory.multicrop_view_fn(cfg)
    view_fn = augment.view_fn_for(cfg.data)
    if spec.views == "single" or cfg.data.aug_mode == "same" or cached_teachers:
        view_fn = view_fn.select(("student",))
    return view_fn


def train_data(r, step, num_shards=1, shard_index=0, shard_batch_size=None):
    """The training batches from optimizer step `step` on (one worker's share).

    Fit epochs need not match data epochs (--steps_per_epoch), so the data position (data
    epoch, batches into it) is derived from the step count.
    """
    from kd_keras.data import sources as data
    from kd_keras.data import teacher_cache

    cfg = r.cfg
    start_epoch, skip_batches = divmod(step, r.train_info.num_examples // cfg.optim.batch_size)
    ds = data.make_train_dataset(
        r.train_examples,
        r.view_fn,
        cfg.optim.batch_size,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        cache_decoded=cfg.data.cache_decoded,
        start_epoch=start_epoch,
        skip_batches=skip_batches,
        deterministic=cfg.data.deterministic,
        view_epochs=r.caches[0].epochs if r.caches else None,
        num_shards=num_shards,
        shard_index=shard_index,
        shard_batch_size=shard_batch_size,
    )
    if r.caches:
        ds = teacher_cache.attach_features(ds, r.caches)
    return ds


def fit_data(r, step):
    """`train_data` from `step`; under multi-worker each worker builds only its share of
    every global batch (kd_keras.data sharding), so no two workers see the same example."""
    if not r.multi_worker:
        return train_data(r, step)
    return r.strategy.distribute_datasets_from_function(
        lambda ctx: train_data(
            r,
            step,
            ctx.num_input_pipelines,
            ctx.input_pipeline_id,
            ctx.get_per_replica_batch_size(r.cfg.optim.batch_size),
        )
    )


def build_model(r):
    """Student, method, optimizer and compile, restored to the resumed step."""
    import keras

    from kd_keras.methods import registry
    from kd_keras.optim import optimizers
    from kd_keras.training import precision

    cfg, size = r.cfg, r.cfg.data.image_size
    # Re-seed here so the student's initialisation does not depend on whether a recipe
    # teacher was just trained in this process or reused from an earlier one.
    keras.utils.set_random_seed(cfg.seed)
    # Layers take the dtype policy they are built under; BN, losses and Sinkhorn stay float32.
    with r.strategy.scope(), precision.policy_scope(cfg.precision):
        r.student = build_student(cfg, size)
        r.method = registry.build_method(
            cfg, r.student, r.teachers, r.train_info.num_classes, r.steps_per_epoch
        )
        jit_compile, why = precision.choose_jit_compile(
            cfg.jit_compile, size, r.spec.multicrop, grouped_convs=_has_grouped_convs(r.student)
        )
        measure = jit_compile and _measure_xla(r)
        r.method.compile(
            optimizer=optimizers.make_optimizer(cfg.optim, r.steps_per_epoch),
            jit_compile=jit_compile and not measure,
        )
        r.method.build((None, size, size, 3))
        _restore(r)
        _convert_restored_momentum(r)
        if measure:
            jit_compile, why = _measured_jit_compile(r)
            r.method.jit_compile = jit_compile
            r.method.train_function = None  # fit makes it again with the chosen setting
    log.info("XLA jit_compile=%s (%s)", jit_compile, why)


def _restore(r):
    """Restores the resumed step; a checkpoint that does not fit this configuration (another
    student, head, image size) is one line naming what changed, not Keras' variable dump."""
    from kd_keras.artifacts import checkpointing

    try:
        checkpointing.restore(r.method, r.role.checkpoint_dirs, r.done_steps)
    except (ValueError, KeyError, TypeError) as err:
        changed = "; ".join(r.config_changes) or "no setting of config.json changed"
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"--workdir={r.cfg.workdir}: its checkpoint of step {r.done_steps} does not fit "
            f"this command's configuration (changed: {changed}); resume with the original "
            f"flags or use another --workdir. ({detail})"
        ) from err


def _convert_restored_momentum(r):
    """Checkpoint slots written under another --momentum_form, rewritten into this run's
    (`optimizers.convert_momentum`; documented there)."""
    from kd_keras.optim import optimizers

    opt = getattr(r.method.optimizer, "inner_optimizer", r.method.optimizer)
    if not (r.done_steps and r.saved_momentum_form and isinstance(opt, optimizers.SGD)):
        return
    if r.saved_momentum_form != opt.momentum_form:
        log.warning(
            "checkpoint momentum written with --momentum_form=%s, converted to %s at step %d",
            r.saved_momentum_form,
            opt.momentum_form,
            r.done_steps,
        )
        optimizers.convert_momentum(opt, r.saved_momentum_form, r.done_steps)


def _measure_xla(r):
    """Whether --jit_compile unset is decided by timing (`kd_keras.xla_choice`): a CPU-only,
    single-replica run long enough to repay the timing; otherwise the rule's choice stands."""
    from kd_keras.training import precision, xla_choice

    steps_left = r.cfg.optim.epochs * r.steps_per_epoch - r.done_steps
    return (
        r.cfg.jit_compile is None
        and not precision.machine_gpu_capabilities()
        and r.strategy.num_replicas_in_sync == 1
        and not r.multi_worker
        and steps_left >= xla_choice.MIN_STEPS_TO_MEASURE
    )


def _measured_jit_compile(r):
    from kd_keras.training import precision, xla_choice

    def first_batch():
        return next(iter(train_data(r, r.done_steps)))

    return xla_choice.choose_by_measurement(
        r.cfg, r.method, first_batch, r.strategy, precision.machine_cpu_flags(), log=log.info
    )


def _has_grouped_convs(model):
    """Whether `model` holds a grouped convolution (RegNets), which XLA runs slowly on a CPU."""
    from kd_keras.nets import backbones

    return any(isinstance(layer, backbones.GroupedConv2D) for layer in model._flatten_layers())


def make_callbacks(r, extra_callbacks=()):
    """NaN guard, the method's own callbacks, checkpoints, pre-emption, TensorBoard, extras,
    view images and the k-NN monitor, in that order."""
    import keras

    from kd_keras.artifacts import checkpointing
    from kd_keras.methods import registry
    from kd_keras.training import callbacks, preemption

    cfg, role = r.cfg, r.role
    own = registry.resolve(r.spec.callbacks)
    cbs = [
        callbacks.NaNGuard(hint=r.spec.nan_hint, checkpoint_dir=role.checkpoint_dirs[0]),
        # Before TensorBoard, so that the epoch logs it writes include theirs.
        *(own(cfg) if own else ()),
        # Every worker saves (its own copy); resuming restarts at the exact optimizer step.
        checkpointing.StepCheckpoint(
            role.checkpoint_dirs[0], save_freq=cfg.save_freq, data=data_mapping(r)
        ),
        # After StepCheckpoint: SIGTERM/SIGINT save the step just finished, then stop the run.
        preemption.PreemptionGuard(
            role.checkpoint_dirs[0],
            agree_every=cfg.save_freq if isinstance(cfg.save_freq, int) else None,
            data=data_mapping(r),
        ),
        keras.callbacks.TensorBoard(role.logdir, update_freq="epoch"),
        *extra_callbacks,
    ]
    if cfg.log_images and role.is_chief:
        cbs.append(_view_logger(r))
    if cfg.eval.knn_monitor_every and role.is_chief:
        monitor = _knn_monitor(
            cfg, r.student, r.train_examples, r.train_info, r.eval_examples, r.eval_info
        )
        if monitor is not None:
            cbs.append(monitor)
    return cbs


def _view_logger(r):
    """Logs the first batch's views: student / teacher, or the first crop of each size."""
    from kd_keras.training import callbacks

    first = next(iter(train_data(r, r.done_steps).take(1)))
    views = {k: v for k, v in first.items() if k in ("student", "teacher")}
    views.update({k: v[:, 0] for k, v in first.items() if k in ("large", "small")})
    return callbacks.ViewImageLogger(r.role.logdir, views, r.cfg.log_images)


def fit(r, cbs):
    """Trains the steps left; returns the final epoch logs (of the checkpoint when none were
    left, as in a re-run after a kill in the final phase)."""
    from kd_keras.artifacts import checkpointing

    history = fit_from_step(
        r.method,
        functools.partial(fit_data, r),
        r.done_steps,
        r.steps_per_epoch,
        r.cfg.optim.epochs,
        validation_data=_validation_data(r),
        callbacks=cbs,
        verbose=r.cfg.verbose,
    )
    last_logs = {k: float(v[-1]) for k, v in history.items() if v}
    return last_logs or checkpointing.last_logs(r.role.checkpoint_dirs[0])


def _validation_data(r):
    """Per-epoch validation batches ("student" + "label", centre crops), or None: MSE/cosine
    to each teacher (distillation), accuracy (supervised)."""
    from kd_keras.data import augment
    from kd_keras.data import sources as data

    if not r.spec.validate_each_epoch or r.eval_examples is None:
        return None
    if r.spec.needs_labels and not r.eval_info.has_labels:
        return None
    size = r.cfg.data.image_size
    ds = data.make_eval_dataset(
        r.eval_examples, lambda im: augment.center_crop(im, size), r.cfg.eval.eval_batch_size
    )
    return ds.map(lambda b: {"student": b["image"], "label": b["label"]})


def run_summary(r, last_logs, train_seconds):
    """The results.json entries every run has."""
    cfg, info = r.cfg, r.train_info
    return {
        "method": cfg.method,
        "student": cfg.model.student,
        "teachers": [t.name for t in r.teachers],
        "dataset": cfg.data.dataset,
        "train_split": cfg.data.train_split,
        "eval_split": r.eval_split if r.eval_info else None,
        # Undecodable train images, found once when the split was loaded and left out.
        "skipped_train_files": {"count": info.skipped_files, "first": list(info.skipped_names)},
        "epochs": cfg.optim.epochs,
        "steps": int(r.method.optimizer.iterations.numpy()),
        "final_learning_rate": float(r.method.optimizer.learning_rate.numpy()),
        "train_seconds_this_invocation": round(train_seconds, 1),
        "final_logs": last_logs,
    }


def final_evaluation(r, step):
    """k-NN of the student, each teacher, the method's other networks and a random student
    (backbone features, cosine, majority vote: the SimReg protocol). Chief only: under a
    multi-worker strategy the others wait at the end."""
    from kd_keras.eval import features, protocols
    from kd_keras.methods import registry

    if not r.labelled_eval:
        return {}
    cfg = r.cfg
    train_eval, test_eval = _knn_datasets(r)
    memory_size = features.every_nth_count(r.train_info.num_examples, cfg.eval.knn_max_train)
    ks = tuple(k for k in cfg.eval.knn_k if k <= memory_size)

    def knn_of(embed):
        return protocols.knn_of_embedding(embed, train_eval, test_eval, ks, vote="majority")

    networks = {"student": r.student}
    networks.update({f"teacher_{t.name}": t for t in r.teachers})
    extra = registry.resolve(r.spec.knn_networks)
    if extra is not None:
        networks.update(extra(r.method))
    if r.spec.knn_random_init:
        networks["random_init_student"] = _random_student(r)
    knn_results = {"protocol": "knn cosine majority vote, backbone features, centre crop"}
    knn_results.update({name: knn_of(net) for name, net in networks.items()})
    _log_knn_to_tensorboard(os.path.join(cfg.workdir, LOG_DIR, "knn"), knn_results, step)
    return {
        "knn": knn_results,
        "num_train": r.train_info.num_examples,
        "num_eval": r.eval_info.num_examples,
    }


def _knn_datasets(r):
    """Centre-crop batches of the k-NN memory (--knn_max_train: every n-th example, since
    files are ordered by class and the first n would miss classes) and of the eval split."""
    from kd_keras.data import augment
    from kd_keras.data import sources as data
    from kd_keras.eval import features

    cfg = r.cfg
    memory = features.every_nth_examples(
        r.train_examples, r.train_info.num_examples, cfg.eval.knn_max_train
    )

    def transform(image):
        return augment.center_crop(image, cfg.data.image_size)

    batch = cfg.eval.eval_batch_size
    return (
        data.make_eval_dataset(memory, transform, batch),
        data.make_eval_dataset(r.eval_examples, transform, batch),
    )


def _random_student(r):
    """A student with fresh weights (seed + 1): the k-NN floor the trained one must beat."""
    import keras

    # Only the chief gets here: under a multi-worker strategy, creating variables in its
    # scope would start a broadcast that the other workers never join.
    with r.strategy.scope() if not r.multi_worker else contextlib.nullcontext():
        keras.utils.set_random_seed(r.cfg.seed + 1)
        return build_student(r.cfg, r.cfg.data.image_size)


def _export_or_report(r):
    """`export_run`, but a failed write (disk full, permissions) after training costs only the
    export: the results and DONE are still written, with the failure recorded and logged (the
    checkpoint holds the trained weights; the export is atomic, nothing half-written)."""
    import tensorflow as tf

    try:
        return export_run(r)
    except (OSError, tf.errors.OpError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        log.error(
            "export to %s failed (%s); results.json and DONE are written without it. "
            "Re-export from the checkpoint with evaluate --from_checkpoint, or free space and "
            "rerun (training is done and will not repeat).",
            os.path.join(r.cfg.workdir, EXPORT_DIR),
            reason,
        )
        print(f"kd_keras.train: export failed: {reason}", file=sys.stderr, flush=True)
        return {"export": None, "export_error": reason}


def export_run(r):
    """Exports the method's backbone (the student, unless its exporter says otherwise) as a
    SavedModel + .keras under `<workdir>/export`; returns the results entries."""
    from kd_keras.artifacts import export
    from kd_keras.methods import registry

    cfg = r.cfg
    exporter = registry.resolve(r.spec.exporter)
    if exporter is None:
        out = registry.Export(r.student, cfg.model.student, heads=getattr(r.method, "heads", None))
    else:
        out = exporter(cfg, r.method, cfg.workdir, r.student)
    path = export.export_backbone(
        out.backbone,
        os.path.join(cfg.workdir, EXPORT_DIR),
        metadata={
            "backbone": out.backbone_name,
            "method": cfg.method,
            "image_size": cfg.data.image_size,
        },
        heads=out.heads,
    )
    return {**out.results, "export": path}


def _write_results(workdir, results):
    from kd_keras.artifacts import checkpointing

    checkpointing.write_json(os.path.join(workdir, RESULTS), results)


def _write_done_marker(workdir):
    from kd_keras.artifacts import checkpointing

    checkpointing.write_atomic(os.path.join(workdir, DONE_MARKER), "done\n")


def _knn_monitor(cfg, student, train_examples, train_info, eval_examples, eval_info):
    """The `KNNMonitor` of --knn_monitor_every, or None when the data has no labelled eval split.

    Both sets are bounded by taking every n-th example (files are ordered by class, so the
    first n would miss classes) and use the centre-crop evaluation transform.
    """
    from kd_keras.data import augment
    from kd_keras.data import sources as data
    from kd_keras.eval import features, monitor

    if eval_examples is None or not (train_info.has_labels and eval_info.has_labels):
        log.warning("--knn_monitor_every needs labelled train and eval splits; monitor off.")
        return None

    def bounded(examples, num, cap):
        examples = features.every_nth_examples(examples, num, cap)
        ds = data.make_eval_dataset(
            examples, lambda im: augment.center_crop(im, cfg.data.image_size), 256
        )
        return ds.map(lambda b: {"image": b["image"], "label": b["label"]})

    return monitor.KNNMonitor(
        student,
        bounded(train_examples, train_info.num_examples, cfg.eval.knn_monitor_max_train),
        bounded(eval_examples, eval_info.num_examples, cfg.eval.knn_monitor_max_test),
        every=cfg.eval.knn_monitor_every,
        ks=cfg.eval.knn_k,
        logdir=os.path.join(cfg.workdir, LOG_DIR, "knn_monitor"),
        history_path=os.path.join(cfg.workdir, monitor.KNN_MONITOR_FILE),
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


def _print_summary(results, workdir):
    # A supervised run trains "the network" (a baseline, or a recipe teacher), not a student.
    who = "network" if results["method"] == "supervised" else "student"
    print(f"\n== {results['method']} | {who} {results['student']} | {results['steps']} steps ==")
    for name, metrics in results.get("knn", {}).items():
        if name == "protocol":
            continue
        shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        label = name.replace("student", who)  # results.json keeps its keys
        print(f"k-NN {label:>24}: {shown}")
    print(f"results:     {os.path.join(workdir, RESULTS)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, LOG_DIR)}")
    if results.get("export_error"):
        print(f"export FAILED ({results['export_error']}); results and checkpoint are complete")
    elif "export" in results:
        print(
            f"export:      {results['export']} (backbone.keras: keras.models.load_model after "
            "`import kd_keras`)"
        )
    sys.stdout.flush()
