"""The only module that knows absl flags: flags -> frozen dataclasses, saved as JSON.

Everything downstream takes these dataclasses (or plain arguments), never `FLAGS`, so every
component can be built in tests without parsing a command line.

Flagfiles: `--flagfile=flags/simreg.cfg` reads flags from a file; a flagfile may itself contain
`--flagfile=common.cfg` lines (absl resolves them relative to the working directory, so our
flagfiles name their includes relative to the repository root). Flags given on the command line
after the flagfile override it.

Repeated flags (`--teacher`, `--teacher_cache`): a command-line `--teacher=X` replaces the
flagfiles' list (the preset's teacher is dropped); `--teacher+=X` appends X to it instead.
Command lines are parsed by `parse_command_line` (absl's `app.run(main, flags_parser=...)`),
which also turns absl's parse errors and self-including flagfiles into one-line errors.
"""

import dataclasses
import json
import math
import os
import sys

from absl import flags

METHODS = ("simreg", "regress", "regress_bn", "supervised", "swav", "oss", "oss_offline")
# Methods trained on multi-crop views with online clustering (SwAV and OSS).
CLUSTERING_METHODS = ("swav", "oss", "oss_offline")
# Methods that need --teacher.
TEACHER_METHODS = ("simreg", "regress", "regress_bn", "oss_offline")
OPTIMIZERS = ("sgd", "lars")
DROPOUT_POSITIONS = ("output", "input")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
AUGMENTATIONS = ("weak", "strong", "none")
AUG_MODES = ("same", "different")
HEADS = ("linear", "mlp2", "mlp4")
NORMS = ("imagenet", "unit", "minus_one_one", "native")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Methods whose train step can take cached teacher features instead of running the teachers.
CACHE_METHODS = ("simreg", "regress", "regress_bn")

FLAGS = flags.FLAGS


def parse_command_line(argv, prog="kd_keras.train", flag_values=FLAGS):
    """Parses `argv` into `flag_values`; bad input is `<prog>: error: ...` and exit code 2.

    Use as `app.run(main, flags_parser=functools.partial(parse_command_line, prog=...))`.
    Unknown flags, enum values outside their choices, unreadable or self-including
    flagfiles all end in one line instead of absl's FATAL (exit 1) or warning.

    Returns:
      The arguments absl leaves unparsed (argv[0] first), as absl's own parser does.
    """
    try:
        return flag_values(expand_argv(argv, flag_values))
    except (flags.Error, ValueError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"{prog}: error: {lines[0].removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(2)


def expand_argv(argv, flag_values=FLAGS):
    """`argv` with flagfiles inlined and repeated flags given on the command line replacing
    the flagfiles' occurrences (`--NAME+=VALUE` appends instead, keeping them).

    Raises:
      ValueError: a flagfile includes itself, directly or through others.
    """
    multi = {name for name, fl in flag_values._flags().items() if isinstance(fl, flags.MultiFlag)}
    tagged = []  # (from_flagfile, argument)
    replaced = set()
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            tagged += [(False, a) for a in [arg, *rest]]
            break
        if arg in ("--flagfile", "-flagfile") and rest:
            arg = f"--flagfile={rest.pop(0)}"
        if flag_values._is_flag_file_directive(arg):
            _check_flagfile_cycles(flag_values._extract_filename(arg), flag_values)
            tagged += [(True, a) for a in flag_values.read_flags_from_files([arg])]
            continue
        name, append = _flag_name(arg)
        if name in multi:
            if "=" not in arg and rest:
                arg = f"{arg}={rest.pop(0)}"
            if append:
                arg = arg.replace("+=", "=", 1)
            else:
                replaced.add(name)
        tagged.append((False, arg))
    kept = [a for from_file, a in tagged if not (from_file and _flag_name(a)[0] in replaced)]
    return [argv[0], *kept]


def _flag_name(arg):
    """('teacher', append?) for '--teacher=x', '-teacher x' or '--teacher+=x'; else (None, _)."""
    if not arg.startswith("-"):
        return None, False
    name = arg.lstrip("-").split("=", 1)[0]
    if name.endswith("+"):
        return name[:-1], True
    return name, False


def _check_flagfile_cycles(filename, flag_values, stack=()):
    """Raises ValueError when `filename` includes itself (absl only warns and drops it)."""
    path = os.path.realpath(filename)
    if path in stack:
        chain = " -> ".join(_short_path(p) for p in (*stack, path))
        raise ValueError(f"--flagfile={filename} includes itself ({chain}).")
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return  # absl reports the unreadable file when it reads it
    for line in lines:
        if flag_values._is_flag_file_directive(line):
            included = flag_values._extract_filename(line.strip())
            _check_flagfile_cycles(included, flag_values, (*stack, path))


def _short_path(path):
    """`path` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_finite_floats(flag_values=FLAGS):
    """Raises ValueError naming the first float flag that is nan or infinite."""
    for name, value in sorted(flag_values.flag_values_dict().items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}.")


def define_flags():
    """Defines kd_keras' flags once (idempotent, so tests may call it repeatedly)."""
    if "method" in FLAGS:
        return
    # Run.
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results, export.")
    flags.DEFINE_enum("method", "simreg", METHODS, "Training method.")
    flags.DEFINE_integer("seed", 0, "Global seed (weights, shuffling, augmentation).")
    flags.DEFINE_enum(
        "strategy",
        "auto",
        STRATEGIES,
        "tf.distribute strategy; auto = "
        "MirroredStrategy over all local GPUs when there are several, else one device.",
    )
    flags.DEFINE_bool("sync_bn", True, "Synchronise BatchNorm statistics across replicas.")
    flags.DEFINE_bool("export", True, "Export the student backbone as a SavedModel at the end.")
    flags.DEFINE_bool("evaluate", True, "Run k-NN evaluation of the student (and teachers).")
    flags.DEFINE_string(
        "save_freq",
        "epoch",
        "Checkpoint frequency for resuming: 'epoch', or N to also save every N optimizer steps "
        "(a killed run then loses at most N steps and resumes at the exact step).",
    )
    flags.DEFINE_float(
        "multi_worker_timeout",
        600.0,
        "--strategy=multi_worker: seconds to wait for every worker of TF_CONFIG to start "
        "before giving up with an error.",
    )
    flags.DEFINE_integer(
        "worker_restarts",
        3,
        "--strategy=multi_worker: times a worker restarts itself from its checkpoint after a "
        "peer failed (it then waits --multi_worker_timeout for the peer to come back).",
    )
    flags.DEFINE_integer("log_images", 4, "Augmented views written to TensorBoard (0 = none).")
    flags.DEFINE_integer("verbose", 1, "Keras fit verbosity (0 silent, 1 progress bar, 2 line).")
    # Data.
    flags.DEFINE_string(
        "dataset",
        "digits",
        "'digits' (embedded, scikit-learn), an image "
        "folder path (or 'folder:PATH') with train/ and val/ class subfolders, or "
        "'tfds:NAME'.",
    )
    flags.DEFINE_string("data_dir", None, "TFDS data directory (for --dataset=tfds:NAME).")
    flags.DEFINE_bool("download", False, "Allow TFDS to download and prepare the dataset.")
    flags.DEFINE_string("train_split", "train", "Split used for distillation and as k-NN memory.")
    flags.DEFINE_string(
        "eval_split",
        None,
        "Split used for evaluation; default: 'test' for "
        "digits, 'val' for folders, 'test' for TFDS.",
    )
    flags.DEFINE_integer("image_size", 32, "Side of the square training views, pixels.")
    flags.DEFINE_enum("augment", "weak", AUGMENTATIONS, "SimReg B.2 augmentation strength.")
    flags.DEFINE_enum(
        "aug_mode",
        "same",
        AUG_MODES,
        "'same': one augmented image for teacher "
        "and student (SimReg's best); 'different': two augmentations.",
    )
    flags.DEFINE_float("crop_scale_min", 0.2, "Lower bound of the random-resized-crop area.")
    flags.DEFINE_integer("shuffle_buffer", 10000, "Shuffle buffer size (examples).")
    flags.DEFINE_bool("cache_decoded", False, "Cache decoded images in memory.")
    flags.DEFINE_bool(
        "deterministic",
        True,
        "Keep tf.data's parallel maps in order (batches identical run to run); false lets "
        "them emit elements as they finish (faster; each view is still keyed by its example).",
    )
    # Networks.
    flags.DEFINE_string("student", "resnet18", "Student backbone name.")
    flags.DEFINE_enum("student_norm", "imagenet", NORMS, "Input normalisation of the student.")
    flags.DEFINE_enum(
        "small_stem",
        "auto",
        ["auto", "true", "false"],
        "CIFAR-style stem (3x3 conv, no max-pool); auto = when --image_size <= 64.",
    )
    flags.DEFINE_multi_string(
        "teacher",
        [],
        "Teacher spec, repeat for several teachers: a path "
        "(SavedModel dir, .keras file, kd_keras run dir), 'app:NAME=WEIGHTS', "
        "or 'recipe:supervised'; options after commas, e.g. "
        "'path=/m.keras,norm=unit,name=moco'. See kd_keras/teachers.py.",
    )
    flags.DEFINE_string("teacher_recipe_backbone", "resnet50", "Backbone of a recipe teacher.")
    flags.DEFINE_integer("teacher_recipe_epochs", 10, "Epochs of a recipe teacher.")
    flags.DEFINE_float("teacher_recipe_lr", 0.1, "Base lr (batch 256) of a recipe teacher.")
    flags.DEFINE_enum("head", "mlp4", HEADS, "SimReg prediction head.")
    flags.DEFINE_list("head_hidden_dims", None, "Override hidden sizes of the head.")
    # Optimisation (SimReg B.3 defaults).
    flags.DEFINE_integer("batch_size", 256, "Global batch size (split across replicas).")
    flags.DEFINE_integer("epochs", 130, "Training epochs.")
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch; default: examples // batch.")
    flags.DEFINE_float("lr", 0.05, "Learning rate at batch 256 (see --lr_scaling).")
    flags.DEFINE_enum("lr_scaling", "linear", ["linear", "none"], "linear: lr * batch / 256.")
    flags.DEFINE_enum("schedule", "cosine", SCHEDULES, "Learning-rate schedule.")
    flags.DEFINE_float("warmup_epochs", 0.0, "Linear warm-up epochs.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float(
        "weight_decay", 1e-4, "L2 weight decay added to the gradient (PyTorch SGD semantics)."
    )
    # Speed: precision, XLA, cached teacher features.
    flags.DEFINE_enum(
        "precision",
        "float32",
        PRECISIONS,
        "Compute dtype policy of the student and heads; losses, Sinkhorn and softmax stay "
        "float32 and mixed_float16 uses dynamic loss scaling. Runs as asked on every device, "
        "with a warning where the device has no native support (e.g. float16 on a CPU).",
    )
    flags.DEFINE_bool(
        "jit_compile",
        None,
        "Compile the train/test steps with XLA. Unset: chosen per run and logged (on with a "
        "GPU; on a CPU for single-crop methods at >= 64 px; see "
        "kd_keras.precision.choose_jit_compile).",
    )
    flags.DEFINE_bool(
        "op_determinism",
        False,
        "tf.config.experimental.enable_op_determinism(): bit-reproducible kernels (slower).",
    )
    flags.DEFINE_multi_string(
        "teacher_cache",
        [],
        "Directory written by `python -m kd_keras.cache_teacher` (repeat for several teachers, "
        "or give the parent directory of per-teacher caches): the teachers are not run during "
        "training; each view is replayed from (seed, example, epoch mod E).",
    )
    # Optimiser choice (SwAV / OSS use LARS with a cosine to --final_lr).
    flags.DEFINE_enum("optimizer", "sgd", OPTIMIZERS, "sgd: momentum SGD; lars: SwAV's LARS.")
    flags.DEFINE_float(
        "final_lr", 0.0, "Learning rate at the end of the cosine (batch 256, see --lr_scaling)."
    )
    flags.DEFINE_float("lars_trust", 0.001, "LARS trust coefficient (SwAV: 0.001).")
    flags.DEFINE_bool(
        "lars_exclude_bn_bias", False, "LARS: plain SGD (no adaptation, no decay) for BN/bias."
    )
    # Online clustering: SwAV and OSS (paper 000, appendix A.1 / A.8).
    flags.DEFINE_string("online_teacher", "resnet50", "--method=oss: the teacher backbone.")
    flags.DEFINE_enum(
        "export_network", "student", ["student", "teacher"], "--method=oss: which one to export."
    )
    flags.DEFINE_integer("small_crop_size", 96, "Side of the small multi-crop views (pixels).")
    flags.DEFINE_integer("num_large_crops", 2, "Large crops per image (--image_size side).")
    flags.DEFINE_integer("num_small_crops", 6, "Small crops per image (--small_crop_size side).")
    flags.DEFINE_list("large_crop_scale", ["0.14", "1.0"], "Area range of the large crops.")
    flags.DEFINE_list("small_crop_scale", ["0.05", "0.14"], "Area range of the small crops.")
    flags.DEFINE_float("color_strength", 1.0, "SwAV colour-distortion strength s (0 = none).")
    flags.DEFINE_float("blur_prob", 0.5, "Probability of the Gaussian blur of a crop.")
    flags.DEFINE_integer("num_prototypes", 3000, "Number of prototypes K.")
    flags.DEFINE_integer("proj_dim", 128, "Embedding size E of the projection heads.")
    flags.DEFINE_integer("proj_hidden_dim", 2048, "Hidden width (Linear1) of the heads.")
    flags.DEFINE_list(
        "proj_dropout", ["0.1", "0.05"], "OSS dropout rates at (Linear1, Linear2) of the heads."
    )
    flags.DEFINE_enum(
        "dropout_position",
        "output",
        DROPOUT_POSITIONS,
        "Dropout on each linear layer's output (A.1 pseudo-code) or its input.",
    )
    flags.DEFINE_bool("dropout_views", True, "OSS: add the dropout-pass views (A.1).")
    flags.DEFINE_float("temperature", 0.1, "Softmax temperature of the swapped prediction.")
    flags.DEFINE_float("sinkhorn_epsilon", 0.05, "Entropic regularisation of Sinkhorn.")
    flags.DEFINE_integer("sinkhorn_iters", 3, "Sinkhorn iterations.")
    flags.DEFINE_integer(
        "queue_length", 0, "Queued embeddings per large crop (0 = no queue; OSS: 3840)."
    )
    flags.DEFINE_integer("queue_start_epoch", 15, "Epoch from which the queue enters Sinkhorn.")
    flags.DEFINE_integer(
        "freeze_prototypes_steps", 0, "The prototypes get no update before this step."
    )
    flags.DEFINE_integer("classifier_hidden", 100, "OSS feature classifier hidden width.")
    # Evaluation.
    flags.DEFINE_list("knn_k", ["1", "20"], "k values of the k-NN evaluation.")
    flags.DEFINE_integer("eval_batch_size", 256, "Batch size of feature extraction.")
    flags.DEFINE_integer(
        "knn_max_train",
        None,
        "Use at most this many training examples (every n-th, so all classes stay) as the "
        "k-NN memory (default: all).",
    )
    flags.DEFINE_integer(
        "knn_monitor_every",
        0,
        "During training, log k-NN accuracy of the student to TensorBoard every N epochs "
        "(0 = off); the curve is also kept in <workdir>/knn_monitor.json.",
    )
    flags.DEFINE_integer(
        "knn_monitor_max_train", 2000, "Training examples (every n-th) in the monitor's memory."
    )
    flags.DEFINE_integer(
        "knn_monitor_max_test", 1000, "Evaluation examples (every n-th) the monitor classifies."
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_split: str = "train"
    eval_split: str | None = None
    image_size: int = 32
    augment: str = "weak"
    aug_mode: str = "same"
    crop_scale_min: float = 0.2
    shuffle_buffer: int = 10000
    cache_decoded: bool = False
    deterministic: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    student: str = "resnet18"
    student_norm: str = "imagenet"
    small_stem: bool | None = None
    teachers: tuple[str, ...] = ()
    teacher_recipe_backbone: str = "resnet50"
    teacher_recipe_epochs: int = 10
    teacher_recipe_lr: float = 0.1
    head: str = "mlp4"
    head_hidden_dims: tuple[int, ...] | None = None
    teacher_caches: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 256
    epochs: int = 130
    steps_per_epoch: int | None = None
    lr: float = 0.05
    lr_scaling: str = "linear"
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def scaled_lr(self):
        """Peak learning rate for the global batch (linear scaling rule from batch 256)."""
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / 256.0
        return self.lr


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    knn_k: tuple[int, ...] = (1, 20)
    eval_batch_size: int = 256
    knn_max_train: int | None = None
    knn_monitor_every: int = 0
    knn_monitor_max_train: int = 2000
    knn_monitor_max_test: int = 1000


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """SwAV / OSS settings (defaults: OSS appendix A.1)."""

    optimizer: str = "sgd"
    final_lr: float = 0.0
    lars_trust: float = 0.001
    lars_exclude_bn_bias: bool = False
    online_teacher: str = "resnet50"
    export_network: str = "student"
    small_crop_size: int = 96
    num_large_crops: int = 2
    num_small_crops: int = 6
    large_crop_scale: tuple[float, float] = (0.14, 1.0)
    small_crop_scale: tuple[float, float] = (0.05, 0.14)
    color_strength: float = 1.0
    blur_prob: float = 0.5
    num_prototypes: int = 3000
    proj_dim: int = 128
    proj_hidden_dim: int = 2048
    proj_dropout: tuple[float, float] = (0.1, 0.05)
    dropout_position: str = "output"
    dropout_views: bool = True
    temperature: float = 0.1
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    queue_length: int = 0
    queue_start_epoch: int = 15
    freeze_prototypes_steps: int = 0
    classifier_hidden: int = 100


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str
    method: str = "simreg"
    seed: int = 0
    strategy: str = "auto"
    sync_bn: bool = True
    export: bool = True
    evaluate: bool = True
    save_freq: str | int = "epoch"
    multi_worker_timeout: float = 600.0
    worker_restarts: int = 3
    log_images: int = 4
    verbose: int = 1
    precision: str = "float32"
    jit_compile: bool | None = None
    op_determinism: bool = False
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, path):
        """Writes the resolved configuration as JSON (atomically)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}.")


def _int_list(name, values):
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"--{name} must be a comma-separated list of integers, got {values}."
        ) from err


def config_from_flags(flag_values=FLAGS):
    """Builds and validates a `Config` from parsed flags.

    Raises:
      ValueError: naming the flag, for missing or impossible values.
    """
    fv = flag_values
    check_finite_floats(fv)
    if not fv.workdir:
        raise ValueError("--workdir is required: the run directory for checkpoints and results.")
    save_freq = fv.save_freq
    if save_freq != "epoch":
        try:
            save_freq = int(save_freq)
        except ValueError as err:
            raise ValueError(
                f"--save_freq must be 'epoch' or an integer, got {save_freq!r}."
            ) from err
        _positive("save_freq", save_freq)
    _positive("multi_worker_timeout", fv.multi_worker_timeout)
    if fv.worker_restarts < 0:
        raise ValueError(f"--worker_restarts must be >= 0, got {fv.worker_restarts}.")
    for name in ("batch_size", "epochs", "image_size", "eval_batch_size", "shuffle_buffer"):
        _positive(name, fv[name].value)
    for name in ("steps_per_epoch", "knn_max_train"):
        _positive(name, fv[name].value, allow_none=True)
    if fv.knn_monitor_every < 0:
        raise ValueError(f"--knn_monitor_every must be >= 0, got {fv.knn_monitor_every}.")
    for name in ("knn_monitor_max_train", "knn_monitor_max_test"):
        _positive(name, fv[name].value)
    if fv.lr <= 0:
        raise ValueError(f"--lr must be positive, got {fv.lr}.")
    if not 0.0 < fv.crop_scale_min <= 1.0:
        raise ValueError(f"--crop_scale_min must be in (0, 1], got {fv.crop_scale_min}.")
    if not 0.0 <= fv.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {fv.momentum}.")
    if fv.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {fv.weight_decay}.")
    if fv.warmup_epochs < 0 or fv.warmup_epochs >= fv.epochs:
        raise ValueError(
            f"--warmup_epochs must be in [0, --epochs={fv.epochs}), got {fv.warmup_epochs}."
        )
    knn_k = _int_list("knn_k", fv.knn_k)
    if any(k < 1 for k in knn_k):
        raise ValueError(f"--knn_k values must be >= 1, got {knn_k}.")
    hidden = None
    if fv.head_hidden_dims:
        hidden = _int_list("head_hidden_dims", fv.head_hidden_dims)
    teachers = tuple(fv.teacher)
    cluster = _cluster_config(fv)
    if fv.method in TEACHER_METHODS and not teachers:
        raise ValueError(f"--method={fv.method} distils a teacher: give at least one --teacher.")
    if fv.method in ("regress", "regress_bn") and fv.head != "linear":
        raise ValueError(
            f"--method={fv.method} is a baseline with a linear head; set --head=linear "
            f"(got --head={fv.head})."
        )
    teacher_caches = tuple(os.path.abspath(os.path.expanduser(p)) for p in fv.teacher_cache)
    if teacher_caches and fv.method not in CACHE_METHODS:
        raise ValueError(
            f"--teacher_cache works with --method in {CACHE_METHODS}, got --method={fv.method}."
        )
    small_stem = {"auto": None, "true": True, "false": False}[fv.small_stem]
    return Config(
        workdir=os.path.abspath(os.path.expanduser(fv.workdir)),
        method=fv.method,
        seed=fv.seed,
        strategy=fv.strategy,
        sync_bn=fv.sync_bn,
        export=fv.export,
        evaluate=fv.evaluate,
        save_freq=save_freq,
        multi_worker_timeout=fv.multi_worker_timeout,
        worker_restarts=fv.worker_restarts,
        log_images=fv.log_images,
        verbose=fv.verbose,
        precision=fv.precision,
        jit_compile=fv.jit_compile,
        op_determinism=fv.op_determinism,
        data=DataConfig(
            dataset=fv.dataset,
            data_dir=fv.data_dir,
            download=fv.download,
            train_split=fv.train_split,
            eval_split=fv.eval_split,
            image_size=fv.image_size,
            augment=fv.augment,
            aug_mode=fv.aug_mode,
            crop_scale_min=fv.crop_scale_min,
            shuffle_buffer=fv.shuffle_buffer,
            cache_decoded=fv.cache_decoded,
            deterministic=fv.deterministic,
        ),
        model=ModelConfig(
            student=fv.student,
            student_norm=fv.student_norm,
            small_stem=small_stem,
            teachers=teachers,
            teacher_recipe_backbone=fv.teacher_recipe_backbone,
            teacher_recipe_epochs=fv.teacher_recipe_epochs,
            teacher_recipe_lr=fv.teacher_recipe_lr,
            head=fv.head,
            head_hidden_dims=hidden,
            teacher_caches=teacher_caches,
        ),
        optim=OptimConfig(
            batch_size=fv.batch_size,
            epochs=fv.epochs,
            steps_per_epoch=fv.steps_per_epoch,
            lr=fv.lr,
            lr_scaling=fv.lr_scaling,
            schedule=fv.schedule,
            warmup_epochs=fv.warmup_epochs,
            momentum=fv.momentum,
            weight_decay=fv.weight_decay,
        ),
        eval=EvalConfig(
            knn_k=knn_k,
            eval_batch_size=fv.eval_batch_size,
            knn_max_train=fv.knn_max_train,
            knn_monitor_every=fv.knn_monitor_every,
            knn_monitor_max_train=fv.knn_monitor_max_train,
            knn_monitor_max_test=fv.knn_monitor_max_test,
        ),
        cluster=cluster,
    )


def _float_pair(name, values, lower=0.0, upper=None):
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--{name} must be two comma-separated numbers, got {values}.") from err
    if not all(math.isfinite(v) for v in pair):
        raise ValueError(f"--{name} must be finite numbers, got {values}.")
    if len(pair) != 2 or pair[0] < lower or pair[0] > pair[1] or (upper and pair[1] > upper):
        raise ValueError(f"--{name} must be 'lo,hi' with {lower} <= lo <= hi, got {values}.")
    return pair


def _cluster_config(fv):
    """Validates the SwAV / OSS flags (checked for every method, so typos surface early)."""
    for name in (
        "small_crop_size",
        "num_large_crops",
        "num_prototypes",
        "proj_dim",
        "proj_hidden_dim",
        "sinkhorn_iters",
        "classifier_hidden",
    ):
        _positive(name, fv[name].value)
    for name in ("num_small_crops", "queue_length", "queue_start_epoch", "freeze_prototypes_steps"):
        if fv[name].value < 0:
            raise ValueError(f"--{name} must be >= 0, got {fv[name].value}.")
    if fv.method in CLUSTERING_METHODS and fv.num_large_crops != 2:
        raise ValueError(
            f"--num_large_crops must be 2 for --method={fv.method} (codes come from the two "
            f"large crops), got {fv.num_large_crops}."
        )
    if fv.method in CLUSTERING_METHODS and fv.small_crop_size > fv.image_size:
        raise ValueError(
            f"--small_crop_size={fv.small_crop_size} is larger than the large crops "
            f"(--image_size={fv.image_size})."
        )
    try:
        dropout = tuple(float(v) for v in fv.proj_dropout)
    except ValueError as err:
        raise ValueError(f"--proj_dropout must be two rates, got {fv.proj_dropout}.") from err
    if len(dropout) != 2 or not all(0.0 <= r < 1.0 for r in dropout):
        raise ValueError(f"--proj_dropout rates must be in [0, 1), got {fv.proj_dropout}.")
    if fv.color_strength < 0 or not 0.0 <= fv.blur_prob <= 1.0:
        raise ValueError(
            f"--color_strength must be >= 0 and --blur_prob in [0, 1], got "
            f"{fv.color_strength} and {fv.blur_prob}."
        )
    if fv.temperature <= 0 or fv.sinkhorn_epsilon <= 0:
        raise ValueError("--temperature and --sinkhorn_epsilon must be positive.")
    if fv.final_lr < 0 or fv.final_lr > fv.lr:
        raise ValueError(f"--final_lr must be in [0, --lr={fv.lr}], got {fv.final_lr}.")
    if fv.lars_trust <= 0:
        raise ValueError(f"--lars_trust must be positive, got {fv.lars_trust}.")
    if fv.queue_length and fv.method in CLUSTERING_METHODS and fv.queue_length % fv.batch_size:
        raise ValueError(
            f"--queue_length={fv.queue_length} must be a multiple of the global "
            f"--batch_size={fv.batch_size} (OSS: 3840 = 15 x 256)."
        )
    # Every field has a flag of the same name; these are parsed from strings first.
    parsed = {
        "large_crop_scale": _float_pair("large_crop_scale", fv.large_crop_scale, upper=1.0),
        "small_crop_scale": _float_pair("small_crop_scale", fv.small_crop_scale, upper=1.0),
        "proj_dropout": dropout,
    }
    return ClusterConfig(
        **{
            f.name: parsed[f.name] if f.name in parsed else fv[f.name].value
            for f in dataclasses.fields(ClusterConfig)
        }
    )


def config_from_json(path):
    """Reads a `Config` written by `Config.save` (e.g. from a previous run directory)."""
    with open(path) as f:
        raw = json.load(f)
    sections = {
        "data": DataConfig,
        "model": ModelConfig,
        "optim": OptimConfig,
        "eval": EvalConfig,
        "cluster": ClusterConfig,
    }
    kwargs = {}
    for key, value in raw.items():
        if key in sections:
            fields = {f.name for f in dataclasses.fields(sections[key])}
            value = {
                k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items() if k in fields
            }
            kwargs[key] = sections[key](**value)
        else:
            kwargs[key] = value
    return Config(**kwargs)


# --------------------------------------------------------------------------------------------
# Evaluation command line (python -m kd_keras.evaluate).

EVAL_PROTOCOLS = ("knn", "linear", "finetune1", "finetune10", "mse_cos")
KNN_VOTES = ("majority", "weighted")
LINEAR_PRESETS = ("simreg", "swav")
LINEAR_PATHS = ("cached", "augmented")


def define_evaluate_flags():
    """Defines the evaluation CLI's flags once, on top of `define_flags` (idempotent).

    Flags that mean the same as in training (--dataset, --data_dir, --train_split,
    --eval_split, --image_size, --knn_k, --eval_batch_size, --knn_max_train, --seed) are
    reused, not redefined. For a run directory, --dataset, --data_dir, the splits and
    --image_size default to the run's own values unless given on the command line.
    """
    if "protocols" in FLAGS:
        return
    define_flags()
    flags.DEFINE_string(
        "model",
        None,
        "What to evaluate: a kd_keras run directory (config.json; its export/ or, with "
        "--from_checkpoint or when there is no export, its latest checkpoint), an export "
        "directory (saved_model/ + backbone.keras), a SavedModel directory or a .keras file.",
    )
    flags.DEFINE_list(
        "protocols", ["knn"], f"Comma-separated evaluation protocols from {EVAL_PROTOCOLS}."
    )
    flags.DEFINE_list("knn_votes", list(KNN_VOTES), f"k-NN voting rules from {KNN_VOTES}.")
    flags.DEFINE_float("knn_temperature", 0.07, "Temperature of the weighted (DINO) k-NN vote.")
    flags.DEFINE_string(
        "eval_layer",
        "backbone",
        "Features to evaluate: 'backbone' (the pooled output), a backbone layer such as "
        "'stem' or 'stage2' (spatially pooled to about the backbone's dimension), "
        "'head_<teacher>' (a prediction head's output) or 'head_<teacher>/<layer>' (e.g. "
        "head_t0/linear2).",
    )
    flags.DEFINE_enum("linear_preset", "simreg", LINEAR_PRESETS, "Linear-probe protocol.")
    flags.DEFINE_enum(
        "linear_path",
        "cached",
        LINEAR_PATHS,
        "cached: train the probe on centre-crop features extracted once (fast); augmented: "
        "random-resized-crop + flip images through the frozen network every epoch (faithful).",
    )
    flags.DEFINE_integer("linear_epochs", None, "Override the preset's linear-probe epochs.")
    flags.DEFINE_integer("finetune_epochs", None, "Override the fine-tuning epochs (OSS: 20).")
    flags.DEFINE_integer("finetune_batch_size", 256, "Fine-tuning batch size.")
    flags.DEFINE_integer(
        "eval_max_test", None, "Classify at most this many evaluation examples (every n-th)."
    )
    flags.DEFINE_string(
        "eval_dir",
        None,
        "Where results.json, TensorBoard logs and plots go; default <run>/eval for a run "
        "directory, otherwise <model>_eval next to the model.",
    )
    flags.DEFINE_bool(
        "from_checkpoint", False, "For a run directory: use its latest checkpoint, not export/."
    )
    flags.DEFINE_integer(
        "projector_examples", 256, "Labelled test examples for TensorBoard's projector (0 = off)."
    )


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one `python -m kd_keras.evaluate` invocation.

    None for dataset / data_dir / train_split / eval_split / image_size means "the run's own
    value" (run directories) or the training defaults (other models).
    """

    model: str
    protocols: tuple[str, ...] = ("knn",)
    dataset: str | None = None
    data_dir: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    image_size: int | None = None
    knn_k: tuple[int, ...] = (1, 20)
    knn_votes: tuple[str, ...] = KNN_VOTES
    knn_temperature: float = 0.07
    eval_layer: str = "backbone"
    eval_batch_size: int = 256
    knn_max_train: int | None = None
    eval_max_test: int | None = None
    linear_preset: str = "simreg"
    linear_path: str = "cached"
    linear_epochs: int | None = None
    finetune_epochs: int | None = None
    finetune_batch_size: int = 256
    seed: int = 0
    eval_dir: str | None = None
    from_checkpoint: bool = False
    projector_examples: int = 256


def evaluate_config_from_flags(flag_values=FLAGS):
    """Builds and validates an `EvaluateConfig` from parsed flags.

    Raises:
      ValueError: naming the flag, for missing or impossible values.
    """
    fv = flag_values
    check_finite_floats(fv)
    if not fv.model:
        raise ValueError("--model is required: a run directory, export, SavedModel or .keras.")
    protocols = tuple(p.strip() for p in fv.protocols if p.strip())
    if not protocols:
        raise ValueError(f"--protocols is empty; choose from {EVAL_PROTOCOLS}.")
    unknown = [p for p in protocols if p not in EVAL_PROTOCOLS]
    if unknown:
        raise ValueError(f"--protocols: unknown {unknown}; choose from {EVAL_PROTOCOLS}.")
    votes = tuple(v.strip() for v in fv.knn_votes if v.strip())
    bad_votes = [v for v in votes if v not in KNN_VOTES]
    if not votes or bad_votes:
        raise ValueError(f"--knn_votes must be a list from {KNN_VOTES}, got {fv.knn_votes}.")
    knn_k = _int_list("knn_k", fv.knn_k)
    if not knn_k or any(k < 1 for k in knn_k):
        raise ValueError(f"--knn_k values must be >= 1, got {knn_k}.")
    if not fv.knn_temperature > 0:
        raise ValueError(f"--knn_temperature must be positive, got {fv.knn_temperature}.")
    for name in ("eval_batch_size", "finetune_batch_size"):
        _positive(name, fv[name].value)
    for name in ("knn_max_train", "eval_max_test", "linear_epochs", "finetune_epochs"):
        _positive(name, fv[name].value, allow_none=True)
    if fv.projector_examples < 0:
        raise ValueError(f"--projector_examples must be >= 0, got {fv.projector_examples}.")

    def given(name):
        return fv[name].value if fv[name].present else None

    image_size = given("image_size")
    if image_size is not None:
        _positive("image_size", image_size)
    return EvaluateConfig(
        model=os.path.abspath(os.path.expanduser(fv.model)),
        protocols=protocols,
        dataset=given("dataset"),
        data_dir=given("data_dir"),
        train_split=given("train_split"),
        eval_split=given("eval_split"),
        image_size=image_size,
        knn_k=knn_k,
        knn_votes=votes,
        knn_temperature=fv.knn_temperature,
        eval_layer=fv.eval_layer.strip(),
        eval_batch_size=fv.eval_batch_size,
        knn_max_train=fv.knn_max_train,
        eval_max_test=fv.eval_max_test,
        linear_preset=fv.linear_preset,
        linear_path=fv.linear_path,
        linear_epochs=fv.linear_epochs,
        finetune_epochs=fv.finetune_epochs,
        finetune_batch_size=fv.finetune_batch_size,
        seed=fv.seed,
        eval_dir=os.path.abspath(os.path.expanduser(fv.eval_dir)) if fv.eval_dir else None,
        from_checkpoint=fv.from_checkpoint,
        projector_examples=fv.projector_examples,
    )


# ---------------------------------------------------------------------------------------------
# `python -m kd_keras.cache_teacher`: the training flags that define the views (dataset, image
# size, augmentation, seed, teachers) plus these.


def define_cache_flags():
    """Defines the flags of kd_keras.cache_teacher (idempotent); needs `define_flags` too."""
    define_flags()
    if "cache_dir" in FLAGS:
        return
    flags.DEFINE_string(
        "cache_dir", None, "Output directory; one sub-directory per --teacher is written."
    )
    flags.DEFINE_integer(
        "cache_epochs", 10, "Augmentation epochs E stored; training epoch e replays e mod E."
    )
    flags.DEFINE_integer("cache_shard_size", 65536, "Examples per feature shard file.")
    flags.DEFINE_integer("cache_batch_size", 256, "Batch size of the teacher forward passes.")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """What `kd_keras.cache_teacher` writes: the views of `data` and `seed` for `epochs`."""

    cache_dir: str
    teachers: tuple[str, ...]
    epochs: int = 10
    shard_size: int = 65536
    batch_size: int = 256
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


def cache_config_from_flags(flag_values=FLAGS):
    """Builds and validates a `CacheConfig` from parsed flags.

    Raises:
      ValueError: naming the flag, for missing or impossible values.
    """
    fv = flag_values
    check_finite_floats(fv)
    if not fv.cache_dir:
        raise ValueError("--cache_dir is required: where the teacher features are written.")
    if not fv.teacher:
        raise ValueError("--teacher is required: the teacher(s) whose features are cached.")
    for name in ("cache_epochs", "cache_shard_size", "cache_batch_size", "image_size"):
        _positive(name, fv[name].value)
    if not 0.0 < fv.crop_scale_min <= 1.0:
        raise ValueError(f"--crop_scale_min must be in (0, 1], got {fv.crop_scale_min}.")
    return CacheConfig(
        cache_dir=os.path.abspath(os.path.expanduser(fv.cache_dir)),
        teachers=tuple(fv.teacher),
        epochs=fv.cache_epochs,
        shard_size=fv.cache_shard_size,
        batch_size=fv.cache_batch_size,
        seed=fv.seed,
        data=DataConfig(
            dataset=fv.dataset,
            data_dir=fv.data_dir,
            download=fv.download,
            train_split=fv.train_split,
            image_size=fv.image_size,
            augment=fv.augment,
            aug_mode=fv.aug_mode,
            crop_scale_min=fv.crop_scale_min,
            cache_decoded=fv.cache_decoded,
            deterministic=fv.deterministic,
        ),
    )


# ---------------------------------------------------------------------------------------------
# `python -m kd_keras.launch`: starts the workers of a one-host multi-worker run. Its own flags
# only; the training flags after `--` are handed to every worker unchanged.


def define_launch_flags():
    """Defines the flags of kd_keras.launch (idempotent)."""
    if "num_workers" in FLAGS:
        return
    flags.DEFINE_integer("num_workers", 2, "Worker processes to start on this host.")
    flags.DEFINE_string("host", "127.0.0.1", "Address the workers listen on.")
    flags.DEFINE_list(
        "ports", None, "One port per worker (default: free ports chosen by the system)."
    )
    flags.DEFINE_integer(
        "max_restarts",
        3,
        "Times a worker that died (killed, crashed) is started again with the same TF_CONFIG; "
        "the others restart themselves and all resume from their checkpoints.",
    )


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    num_workers: int = 2
    host: str = "127.0.0.1"
    ports: tuple[int, ...] | None = None
    max_restarts: int = 3


def launch_config_from_flags(flag_values=FLAGS):
    """Builds and validates a `LaunchConfig`.

    Raises:
      ValueError: naming the flag, for impossible values.
    """
    fv = flag_values
    _positive("num_workers", fv.num_workers)
    if fv.max_restarts < 0:
        raise ValueError(f"--max_restarts must be >= 0, got {fv.max_restarts}.")
    ports = None
    if fv.ports:
        ports = _int_list("ports", fv.ports)
        if len(ports) != fv.num_workers or len(set(ports)) != len(ports):
            raise ValueError(
                f"--ports must list {fv.num_workers} different ports (--num_workers), got {ports}."
            )
        if not all(0 < p < 65536 for p in ports):
            raise ValueError(f"--ports must be in 1-65535, got {ports}.")
    return LaunchConfig(
        num_workers=fv.num_workers, host=fv.host, ports=ports, max_restarts=fv.max_restarts
    )


# ---------------------------------------------------------------------------------------------
# `python -m kd_keras.experiment`: runs the variants of a spec (experiments/*.cfg) through the
# train / cache_teacher / evaluate command lines. Its own flags plus --workdir (the experiment's
# directory); the training flags live in the spec, not on its command line.

EXPERIMENT_SCALES = ("cpu", "gpu")


def experiment_flag_names():
    """Flags that only kd_keras.experiment defines."""
    return ("spec", "scale", "only", "dry_run", "report_only", "teachers_only", "report_dir")


def define_experiment_flags():
    """Defines the flags of kd_keras.experiment (idempotent); reuses --workdir of training."""
    define_flags()
    if "spec" in FLAGS:
        return
    flags.DEFINE_string("spec", None, "Experiment spec file (experiments/NAME.cfg).")
    flags.DEFINE_enum(
        "scale", "cpu", EXPERIMENT_SCALES, "Which [scale ...] section of the spec is applied."
    )
    flags.DEFINE_list(
        "only", None, "Run only these variants (comma-separated names); the report covers all "
        "variants finished so far."
    )
    flags.DEFINE_bool("dry_run", False, "Print the commands the runner would start; run nothing.")
    flags.DEFINE_bool(
        "report_only", False, "Train nothing: write report.md/csv, plots and HParams from the "
        "runs finished so far (e.g. after machines ran --only=... on a shared --workdir)."
    )
    flags.DEFINE_string(
        "report_dir", None, "Where report.md/csv, plots/ and hparams/ go (default: --workdir); "
        "lets several specs share one --workdir (teachers, caches, identical runs)."
    )
    flags.DEFINE_bool(
        "teachers_only", False, "Train the shared teachers and teacher caches only (run this "
        "once before spreading variants over several machines)."
    )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    spec: str
    workdir: str
    scale: str = "cpu"
    only: tuple[str, ...] = ()
    dry_run: bool = False
    report_only: bool = False
    teachers_only: bool = False
    report_dir: str | None = None


def experiment_config_from_flags(flag_values=FLAGS):
    """Builds and validates an `ExperimentConfig`.

    Raises:
      ValueError: naming the flag, for missing or impossible values, and for a training flag
        given on the experiment's command line (it would be silently ignored).
    """
    fv = flag_values
    if not fv.spec:
        raise ValueError("--spec is required: an experiment spec such as experiments/NAME.cfg.")
    if not fv.workdir:
        raise ValueError("--workdir is required: the experiment directory (runs, report).")
    own = set(experiment_flag_names()) | {"workdir", "flagfile"}
    for name, fl in fv._flags().items():
        if fl.present and name not in own and fv.find_module_defining_flag(name) == __name__:
            raise ValueError(
                f"--{name} is a kd_keras.train flag: set it in the spec's [scale] or [variant] "
                "sections, not on the experiment's command line."
            )
    if fv.report_only and fv.teachers_only:
        raise ValueError("--report_only and --teachers_only exclude each other.")
    return ExperimentConfig(
        spec=fv.spec,
        workdir=os.path.abspath(os.path.expanduser(fv.workdir)),
        scale=fv.scale,
        only=tuple(v.strip() for v in (fv.only or ()) if v.strip()),
        dry_run=fv.dry_run,
        report_only=fv.report_only,
        teachers_only=fv.teachers_only,
        report_dir=os.path.abspath(os.path.expanduser(fv.report_dir)) if fv.report_dir else None,
    )
