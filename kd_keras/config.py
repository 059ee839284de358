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

from kd_keras import choices
from kd_keras.methods import registry

# The --method choices and their properties come from the method registry (TF-free).
METHODS = registry.names()
# Methods trained on multi-crop views with online clustering (SwAV and OSS).
CLUSTERING_METHODS = registry.where(lambda spec: spec.multicrop)
# Methods that need --teacher.
TEACHER_METHODS = registry.where(lambda spec: spec.needs_teacher)
# Methods whose train step can take cached teacher features instead of running the teachers.
CACHE_METHODS = registry.where(lambda spec: spec.can_cache_teacher)
OPTIMIZERS = choices.OPTIMIZERS
DROPOUT_POSITIONS = ("output", "input")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
AUGMENTATIONS = choices.AUGMENTATIONS
AUG_MODES = choices.AUG_MODES
VIEW_RESIZES = choices.VIEW_RESIZES
STRONG_BLURS = choices.STRONG_BLURS
HEADS = choices.HEADS
HEAD_INITS = choices.HEAD_INITS
MOMENTUM_FORMS = choices.MOMENTUM_FORMS
NORMS = ("imagenet", "unit", "minus_one_one", "native")
SCHEDULES = choices.SCHEDULES
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

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


def register_method(spec):
    """Registers a method after the flags exist (plug-ins, tests): adds it to --method's
    choices and defines its own flags. Declarations listed in `registry.DECLARATIONS` need
    no call: `define_flags` reads them."""
    registry.register(spec)
    if "method" not in FLAGS:
        return spec
    choices = FLAGS["method"].parser.enum_values
    if spec.name not in choices:
        choices.append(spec.name)
    own = spec.own_flags()
    if spec.define_flags is not None and not all(name in FLAGS for name in own):
        spec.define_flags(flags)
    return spec


def define_flags():
    """Defines kd_keras' flags once (idempotent, so tests may call it repeatedly)."""
    if "method" in FLAGS:
        return
    _define_run_flags()
    _define_data_flags()
    _define_network_flags()
    _define_optim_flags()
    _define_speed_flags()
    _define_cluster_flags()
    _define_eval_flags()
    # Each method's own flags (see kd_keras.methods.registry).
    for spec in registry.specs():
        if spec.define_flags is not None:
            spec.define_flags(flags)


def _define_run_flags():
    """Run: workdir, method, seed, strategy, saving, logging."""
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results, export.")
    flags.DEFINE_enum(
        "method",
        "simreg",
        METHODS,
        "Training method: "
        + "; ".join(f"{s.name}: {s.summary}" for s in registry.specs() if s.summary),
    )
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


def _define_data_flags():
    """Data and augmentation."""
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
    flags.DEFINE_enum(
        "strong_blur",
        "paper",
        STRONG_BLURS,
        "--augment=strong's Gaussian blur: 'paper' = SimReg B.2 (sigma uniform in [0, 1], "
        "every view); 'official' = the authors' code (sigma in [0.1, 2] with p = 0.5).",
    )
    flags.DEFINE_enum(
        "view_resize",
        "auto",
        VIEW_RESIZES,
        "Resize of the random crops: 'auto' = plain bilinear for enlarged crops (the same "
        "interpolation, ~4x faster), antialiased for shrunk ones; 'antialias' = the antialiased "
        "kernel for all (bit-compatible with teacher caches written before this flag).",
    )
    flags.DEFINE_integer("shuffle_buffer", 10000, "Shuffle buffer size (examples).")
    flags.DEFINE_bool("cache_decoded", False, "Cache decoded images in memory.")
    flags.DEFINE_integer(
        "max_image_pixels",
        64_000_000,
        "Image folders: a file whose header claims more pixels (width x height) is never "
        "decoded and is skipped like a corrupt file (a decompression-bomb guard, as PIL's).",
    )
    flags.DEFINE_bool(
        "deterministic",
        True,
        "Keep tf.data's parallel maps in order (batches identical run to run); false lets "
        "them emit elements as they finish (faster; each view is still keyed by its example).",
    )


def _define_network_flags():
    """Student, teachers and the prediction head."""
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
        "(SavedModel dir, .keras file, kd_keras run dir, kd_keras.convert output), "
        "'app:NAME=WEIGHTS', 'torch:ARCH=CHECKPOINT' (converted on first use) or "
        "'recipe:supervised'; options after commas, e.g. "
        "'path=/m.keras,norm=unit,name=moco' (kd_keras/teachers/loading.py).",
    )
    flags.DEFINE_string("teacher_recipe_backbone", "resnet50", "Backbone of a recipe teacher.")
    flags.DEFINE_integer("teacher_recipe_epochs", 10, "Epochs of a recipe teacher.")
    flags.DEFINE_float("teacher_recipe_lr", 0.1, "Base lr (batch 256) of a recipe teacher.")
    flags.DEFINE_enum(
        "head",
        "mlp4",
        HEADS,
        "Prediction head: the paper's linear / mlp2 / mlp4, or the authors' code's variants "
        "linear_official (BN + Linear) and mlp2_official (Linear + Linear, no BN or ReLU).",
    )
    flags.DEFINE_list("head_hidden_dims", None, "Override hidden sizes of the head.")
    flags.DEFINE_bool(
        "head_batch_norm",
        True,
        "BatchNorm after the hidden layers of an mlp2/mlp4 --head (SimReg's heads); false: "
        "Linear-ReLU only, SEED's student MLP (with --head=mlp2 --head_hidden_dims=<m>).",
    )
    flags.DEFINE_enum(
        "head_init",
        "torch",
        HEAD_INITS,
        "How the Dense layers of heads, projection heads, prototypes and classifiers start: "
        "torch = torch.nn.Linear's U(+-1/sqrt(fan_in)) (the authors' code), keras = "
        "glorot-uniform kernels and zero biases.",
    )


def _define_optim_flags():
    """Optimisation (SimReg B.3 defaults), for every method."""
    flags.DEFINE_integer("batch_size", 256, "Global batch size (split across replicas).")
    flags.DEFINE_integer("epochs", 130, "Training epochs.")
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch; default: examples // batch.")
    flags.DEFINE_float("lr", 0.05, "Learning rate at batch 256 (see --lr_scaling).")
    flags.DEFINE_enum("lr_scaling", "linear", ["linear", "none"], "linear: lr * batch / 256.")
    flags.DEFINE_enum("schedule", "cosine", SCHEDULES, "Learning-rate schedule.")
    flags.DEFINE_float(
        "warmup_epochs",
        0.0,
        "Linear warm-up epochs: from 0 with --schedule=cosine; with epoch_cosine whole epochs "
        "stepping from the unscaled --lr to the scaled peak (SEED's warm-up).",
    )
    flags.DEFINE_list(
        "lr_decay_epochs",
        ["90", "120"],
        "--schedule=step: epochs (counted from 0) from which the rate is multiplied by "
        "--lr_decay_rate once more (CompRess' --lr_decay_epochs, whose 1-based epoch e decays "
        "when e > milestone: the same epochs).",
    )
    flags.DEFINE_float(
        "lr_decay_rate", 0.2, "--schedule=step: factor per milestone (CompRess: 0.2)."
    )
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_enum(
        "momentum_form",
        "torch",
        MOMENTUM_FORMS,
        "--optimizer=sgd: torch = torch.optim.SGD (buf = m buf + g; w -= lr buf, the authors' "
        "code), keras = Keras' SGD (v = m v - lr g; w += v); they differ when the lr changes.",
    )
    flags.DEFINE_float(
        "weight_decay", 1e-4, "L2 weight decay added to the gradient (PyTorch SGD semantics)."
    )
    # Optimiser choice, for every method (SwAV / OSS use LARS with a cosine to --final_lr).
    flags.DEFINE_enum("optimizer", "sgd", OPTIMIZERS, "sgd: momentum SGD; lars: SwAV's LARS.")
    flags.DEFINE_float(
        "final_lr",
        0.0,
        "Learning rate at the end of the cosine (batch 256, see --lr_scaling); "
        "--schedule=cosine only.",
    )
    flags.DEFINE_float(
        "lars_trust", 0.001, "LARS trust coefficient (SwAV: 0.001); --optimizer=lars."
    )
    flags.DEFINE_bool(
        "lars_exclude_bn_bias",
        False,
        "LARS: plain SGD (no adaptation, no decay) for BN/bias; --optimizer=lars.",
    )


def _define_speed_flags():
    """Speed: precision, XLA, cached teacher features."""
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
        "kd_keras.training.precision.choose_jit_compile).",
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


def _define_cluster_flags():
    """Online clustering: SwAV and OSS (paper 000, appendix A.1 / A.8)."""
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
    flags.DEFINE_bool(
        "feature_classifier",
        True,
        "OSS: the feature classifier behind a gradient reversal layer (A.1); false trains "
        "without it (Figure 5's ablation).",
    )
    flags.DEFINE_integer("classifier_hidden", 100, "OSS feature classifier hidden width.")
    flags.DEFINE_float(
        "grl_scale",
        1.0,
        "OSS: factor on the gradient reversal multiplier alpha(n) (1 = the paper's schedule; "
        "0 trains the classifier but sends none of its gradient to the networks).",
    )


def _define_eval_flags():
    """The k-NN evaluation and monitor."""
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
    view_resize: str = "auto"
    strong_blur: str = "paper"
    shuffle_buffer: int = 10000
    cache_decoded: bool = False
    deterministic: bool = True
    max_image_pixels: int = 64_000_000


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
    head_batch_norm: bool = True
    head_init: str = "torch"
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
    lr_decay_epochs: tuple[int, ...] = (90, 120)
    lr_decay_rate: float = 0.2
    momentum: float = 0.9
    momentum_form: str = "torch"
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    final_lr: float = 0.0
    lars_trust: float = 0.001
    lars_exclude_bn_bias: bool = False

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
    feature_classifier: bool = True
    classifier_hidden: int = 100
    grl_scale: float = 1.0


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
    # The method's own flags ({flag name: value}, see registry.MethodSpec.options).
    method_options: dict = dataclasses.field(default_factory=dict)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @property
    def spec(self):
        """The `registry.MethodSpec` of `method` (ValueError naming --method if unknown)."""
        return registry.get(self.method)

    def options(self):
        """The method's own options dataclass (None for a method without own flags)."""
        return self.spec.make_options(self.method_options)

    def save(self, path):
        """Writes the resolved configuration as JSON (atomically)."""
        from kd_keras.artifacts import checkpointing  # not at the top: config imports no TensorFlow

        checkpointing.write_atomic(path, self.to_json() + "\n")


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


class _Values(dict):
    """{flag name: value} readable as attributes too (`v.lr`), like absl's FlagValues;
    `defaults` holds each flag's own default."""

    __getattr__ = dict.__getitem__

    def changed(self, name):
        """Whether flag `name` differs from its default (given, or the method's default)."""
        return self[name] != self.defaults[name]


def _effective_values(fv, spec):
    """Every flag's value, with the method's `flag_defaults` for flags given nowhere."""
    values = _Values(fv.flag_values_dict())
    values.defaults = {name: fl.default for name, fl in fv._flags().items()}
    for name, value in spec.flag_defaults.items():
        if name not in fv:
            raise ValueError(f"--method={spec.name}: flag_defaults names no flag --{name}.")
        if not fv[name].present:
            values[name] = value
    return values


def _section(cls, values, **parsed):
    """The dataclass `cls` with every field from the flag of the same name, or `parsed`."""
    return cls(
        **{
            f.name: parsed[f.name] if f.name in parsed else values[f.name]
            for f in dataclasses.fields(cls)
        }
    )


def config_from_flags(flag_values=FLAGS):
    """Builds and validates a `Config` from parsed flags.

    Raises:
      ValueError: naming the flag, for missing or impossible values, and for flags that the
        chosen method, optimizer or schedule would not use.
    """
    fv = flag_values
    check_finite_floats(fv)
    if not fv.workdir:
        raise ValueError("--workdir is required: the run directory for checkpoints and results.")
    spec = registry.get(fv.method)
    v = _effective_values(fv, spec)
    _check_paths(v)
    save_freq = _check_run_flags(v)
    _check_optim_flags(v)
    knn_k = _int_list("knn_k", v.knn_k)
    if any(k < 1 for k in knn_k):
        raise ValueError(f"--knn_k values must be >= 1, got {knn_k}.")
    cfg = Config(
        workdir=os.path.abspath(os.path.expanduser(v.workdir)),
        save_freq=save_freq,
        data=_section(DataConfig, v),
        model=_model_config(v),
        optim=_section(
            OptimConfig, v, lr_decay_epochs=_int_list("lr_decay_epochs", v.lr_decay_epochs)
        ),
        eval=_section(EvalConfig, v, knn_k=knn_k),
        cluster=_cluster_config(v),
        method_options={name: v[name] for name in spec.own_flags()},
        **{
            f.name: v[f.name]
            for f in dataclasses.fields(Config)
            if f.name not in _SECTIONS and f.name not in ("workdir", "save_freq", "method_options")
        },
    )
    check_method_flags(cfg, spec, v)
    return cfg


def _check_paths(v):
    """--workdir can be created (or is a directory) and a --dataset folder exists, checked
    here so that the command line answers before it imports TensorFlow or writes anything."""
    workdir = os.path.abspath(os.path.expanduser(v.workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory.")
    parent = workdir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir={workdir} cannot be created: {parent} is not writable.")
    source = v.dataset
    root = source[len("folder:") :] if source.startswith("folder:") else source
    is_path = source.startswith("folder:") or os.sep in source or source.startswith("~")
    if is_path and not source.startswith("tfds:") and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"--dataset image-folder root does not exist: {root}")


def _check_run_flags(v):
    """Checks the run / data / evaluation numbers; returns the parsed --save_freq."""
    save_freq = v.save_freq
    if save_freq != "epoch":
        try:
            save_freq = int(save_freq)
        except ValueError as err:
            raise ValueError(
                f"--save_freq must be 'epoch' or an integer, got {save_freq!r}."
            ) from err
        _positive("save_freq", save_freq)
    _positive("multi_worker_timeout", v.multi_worker_timeout)
    if v.worker_restarts < 0:
        raise ValueError(f"--worker_restarts must be >= 0, got {v.worker_restarts}.")
    for name in (
        "batch_size",
        "epochs",
        "image_size",
        "eval_batch_size",
        "shuffle_buffer",
        "max_image_pixels",
    ):
        _positive(name, v[name])
    for name in ("steps_per_epoch", "knn_max_train"):
        _positive(name, v[name], allow_none=True)
    if v.knn_monitor_every < 0:
        raise ValueError(f"--knn_monitor_every must be >= 0, got {v.knn_monitor_every}.")
    for name in ("knn_monitor_max_train", "knn_monitor_max_test"):
        _positive(name, v[name])
    if not 0.0 < v.crop_scale_min <= 1.0:
        raise ValueError(f"--crop_scale_min must be in (0, 1], got {v.crop_scale_min}.")
    return save_freq


def _check_optim_flags(v):
    """Checks the optimisation numbers and that each given optimizer flag is used."""
    if v.lr <= 0:
        raise ValueError(f"--lr must be positive, got {v.lr}.")
    if not 0.0 <= v.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {v.momentum}.")
    if v.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {v.weight_decay}.")
    if v.warmup_epochs < 0 or v.warmup_epochs >= v.epochs:
        raise ValueError(
            f"--warmup_epochs must be in [0, --epochs={v.epochs}), got {v.warmup_epochs}."
        )
    if v.final_lr < 0 or v.final_lr > v.lr:
        raise ValueError(f"--final_lr must be in [0, --lr={v.lr}], got {v.final_lr}.")
    if v.lars_trust <= 0:
        raise ValueError(f"--lars_trust must be positive, got {v.lars_trust}.")
    if v.schedule == "epoch_cosine" and v.warmup_epochs != int(v.warmup_epochs):
        raise ValueError(
            f"--warmup_epochs={v.warmup_epochs}: --schedule=epoch_cosine sets the rate once per "
            "epoch, so its warm-up (SEED's) takes whole epochs."
        )
    if v.schedule in ("constant", "step"):
        for name in ("final_lr", "warmup_epochs"):
            if v[name]:
                raise ValueError(
                    f"--{name}={v[name]} has no effect with --schedule={v.schedule}; drop it "
                    "or use --schedule=cosine."
                )
    if v.schedule == "step":
        milestones = _int_list("lr_decay_epochs", v.lr_decay_epochs)
        if not milestones or min(milestones) < 1:
            raise ValueError(f"--lr_decay_epochs must be epochs >= 1, got {v.lr_decay_epochs}.")
        if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
            raise ValueError(
                f"--lr_decay_epochs must be strictly increasing, got {v.lr_decay_epochs}."
            )
        if not 0 < v.lr_decay_rate <= 1:
            raise ValueError(f"--lr_decay_rate must be in (0, 1], got {v.lr_decay_rate}.")
    else:
        for name in ("lr_decay_epochs", "lr_decay_rate"):
            if v.changed(name):
                raise ValueError(
                    f"--{name} applies to --schedule=step, got --schedule={v.schedule}."
                )
    if v.optimizer == "lars" and v.changed("momentum_form"):
        raise ValueError(
            f"--momentum_form={v.momentum_form} applies to --optimizer=sgd; LARS always keeps "
            "torch's momentum buffer."
        )
    if v.optimizer != "lars":
        for name in ("lars_trust", "lars_exclude_bn_bias"):
            if v.changed(name):
                raise ValueError(
                    f"--{name}={v[name]} applies to --optimizer=lars, got "
                    f"--optimizer={v.optimizer}."
                )


def _model_config(v):
    hidden = None
    if v.head_hidden_dims:
        hidden = _int_list("head_hidden_dims", v.head_hidden_dims)
    if not v.head_batch_norm and v.head not in ("mlp2", "mlp4"):
        raise ValueError(
            f"--head_batch_norm=false has no effect with --head={v.head} (only mlp2 / mlp4 "
            "have BN before their ReLUs)."
        )
    return _section(
        ModelConfig,
        v,
        small_stem={"auto": None, "true": True, "false": False}[v.small_stem],
        teachers=tuple(v.teacher),
        head_hidden_dims=hidden,
        teacher_caches=tuple(os.path.abspath(os.path.expanduser(p)) for p in v.teacher_cache),
    )


def _applies_to(flag, methods, method):
    return ValueError(f"--{flag} applies to --method in {methods}, got --method={method}.")


def check_method_flags(cfg, spec, values=None):
    """Rejects flags `spec`'s method cannot use, then runs the method's own `validate`.

    Args:
      cfg: the built `Config`.
      spec: its `registry.MethodSpec`.
      values: the effective flag values ({name: value}); None skips the checks of flags
        against their defaults (a `Config` built in code).
    Raises:
      ValueError: naming the flag.
    """
    m = cfg.method
    if spec.needs_teacher and not cfg.model.teachers:
        raise ValueError(f"--method={m} distils a teacher: give at least one --teacher.")
    if cfg.model.teachers and not spec.needs_teacher:
        raise _applies_to("teacher", TEACHER_METHODS, m)
    if cfg.model.teacher_caches and not spec.can_cache_teacher:
        raise ValueError(
            f"--teacher_cache works with --method in {CACHE_METHODS}, got --method={m}."
        )
    if cfg.optim.optimizer not in spec.optimizers:
        raise ValueError(
            f"--optimizer={cfg.optim.optimizer}: --method={m} trains with {spec.optimizers}."
        )
    if spec.views == "single" and cfg.data.aug_mode != "same":
        raise ValueError(
            f"--aug_mode={cfg.data.aug_mode} needs two views; --method={m} trains on one."
        )
    if values is not None:
        _check_unused_defaults(cfg, spec, values)
    if spec.validate is not None:
        spec.validate(cfg)


def _check_unused_defaults(cfg, spec, values):
    """Flags of one kind of method given (away from their default) for another kind."""
    m = cfg.method
    changed = values.changed
    unused = []
    if spec.multicrop:
        unused += [n for n in ("augment", "aug_mode", "crop_scale_min", "strong_blur")]
    elif cfg.data.augment != "strong" and changed("strong_blur"):
        raise ValueError(
            f"--strong_blur is the blur of --augment=strong; this run uses "
            f"--augment={cfg.data.augment}."
        )
    else:
        unused += [f.name for f in dataclasses.fields(ClusterConfig)]
    if not spec.teacher_features:
        unused += ["head", "head_hidden_dims", "head_batch_norm"]
    for name in unused:
        if changed(name):
            users = (
                CLUSTERING_METHODS
                if name in _CLUSTER_FLAGS
                else (
                    registry.where(lambda s: s.teacher_features)
                    if name.startswith("head")
                    else registry.where(lambda s: not s.multicrop)
                )
            )
            raise _applies_to(name, users, m)
    for name, reason in (spec.unused_flags(cfg) if spec.unused_flags else {}).items():
        if changed(name):
            raise ValueError(f"--{name} is not used here: {reason}")
    for other in registry.specs():
        if other.name == m:
            continue
        for name in other.own_flags():
            if name not in spec.own_flags() and changed(name):
                users = registry.where(lambda s, n=name: n in s.own_flags())
                raise _applies_to(name, users, m)


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


def _cluster_config(v):
    """Validates the SwAV / OSS values (checked for every method, so typos surface early;
    the checks that need the method are `clustering_spec.validate_clustering`)."""
    for name in (
        "small_crop_size",
        "num_large_crops",
        "num_prototypes",
        "proj_dim",
        "proj_hidden_dim",
        "sinkhorn_iters",
        "classifier_hidden",
    ):
        _positive(name, v[name])
    for name in ("num_small_crops", "queue_length", "queue_start_epoch", "freeze_prototypes_steps"):
        if v[name] < 0:
            raise ValueError(f"--{name} must be >= 0, got {v[name]}.")
    try:
        dropout = tuple(float(r) for r in v.proj_dropout)
    except ValueError as err:
        raise ValueError(f"--proj_dropout must be two rates, got {v.proj_dropout}.") from err
    if len(dropout) != 2 or not all(0.0 <= r < 1.0 for r in dropout):
        raise ValueError(f"--proj_dropout rates must be in [0, 1), got {v.proj_dropout}.")
    if v.color_strength < 0 or not 0.0 <= v.blur_prob <= 1.0:
        raise ValueError(
            f"--color_strength must be >= 0 and --blur_prob in [0, 1], got "
            f"{v.color_strength} and {v.blur_prob}."
        )
    if v.temperature <= 0 or v.sinkhorn_epsilon <= 0:
        raise ValueError("--temperature and --sinkhorn_epsilon must be positive.")
    if not v.grl_scale >= 0:
        raise ValueError(f"--grl_scale must be >= 0, got {v.grl_scale}.")
    return _section(
        ClusterConfig,
        v,
        large_crop_scale=_float_pair("large_crop_scale", v.large_crop_scale, upper=1.0),
        small_crop_scale=_float_pair("small_crop_scale", v.small_crop_scale, upper=1.0),
        proj_dropout=dropout,
    )


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "cluster": ClusterConfig,
}
_CLUSTER_FLAGS = frozenset(f.name for f in dataclasses.fields(ClusterConfig))


def config_from_json(path):
    """Reads a `Config` written by `Config.save` (e.g. from a previous run directory).

    Runs written before the optimizer flags applied to every method kept --optimizer,
    --final_lr and --lars_* in their "cluster" section; they are read into "optim". Runs
    written before --view_resize get its value then, "antialias"; before --strong_blur,
    "paper".
    """
    with open(path) as f:
        raw = json.load(f)
    # Runs written before --view_resize resized every crop with the antialiased kernel.
    raw.setdefault("data", {}).setdefault("view_resize", "antialias")
    raw["data"].setdefault("strong_blur", "paper")  # the only blur before --strong_blur
    for key in [k for k in raw.get("cluster", {}) if k in _field_names(OptimConfig)]:
        raw.setdefault("optim", {})[key] = raw["cluster"].pop(key)
    kwargs = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            fields = _field_names(_SECTIONS[key])
            value = {
                k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items() if k in fields
            }
            kwargs[key] = _SECTIONS[key](**value)
        else:
            kwargs[key] = value
    return Config(**kwargs)


def _field_names(cls):
    return {f.name for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------
# Evaluation command line (python -m kd_keras.evaluate).

EVAL_PROTOCOLS = ("knn", "linear", "finetune1", "finetune10", "mse_cos", "transfer")
KNN_VOTES = choices.KNN_VOTES
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
    _define_transfer_flags()


# SimReg B.4's weight decays, 10^-10 .. 10^-2 (kd_keras.eval.transfer.B4_WEIGHT_DECAYS).
TRANSFER_WEIGHT_DECAYS = tuple(10.0**e for e in range(-10, -1))


def _define_transfer_flags():
    """Flags of --protocols=transfer (kd_keras.eval.transfer; docs/transfer.md)."""
    flags.DEFINE_string(
        "transfer_data",
        None,
        "--protocols=transfer: the other dataset, an image folder root/<split>/<class>/*.jpg "
        "('folder:/path' or a directory), 'tfds:NAME' prepared on disk, or 'digits'.",
    )
    flags.DEFINE_string("transfer_data_dir", None, "TFDS data directory of --transfer_data.")
    flags.DEFINE_string("transfer_train_split", "train", "Training split of --transfer_data.")
    flags.DEFINE_string(
        "transfer_val_split",
        "auto",
        "Validation split of the grid search: a split name; 'auto' (the dataset's own "
        "val/validation split when it has one other than the test split, else a seeded "
        "stratified part of train); 'from_train' (always that part of train).",
    )
    flags.DEFINE_string("transfer_test_split", "test", "Split of --transfer_data scored.")
    flags.DEFINE_float(
        "transfer_val_fraction", 0.2, "Part of train held out for validation when it is split."
    )
    flags.DEFINE_list(
        "transfer_weight_decays",
        [f"{v:g}" for v in TRANSFER_WEIGHT_DECAYS],
        "Weight decays searched (scikit-learn C = 1 / (wd * n)); default SimReg B.4's grid.",
    )
    flags.DEFINE_integer("transfer_max_iter", 1000, "L-BFGS iterations per fit at most.")
    flags.DEFINE_integer(
        "transfer_blas_threads",
        1,
        "BLAS threads of the classifier fits: 1 is fastest for small feature matrices and on "
        "a busy machine; 0 = the library default (all cores), for large ones.",
    )
    flags.DEFINE_integer(
        "transfer_max_examples",
        None,
        "At most this many examples per split of --transfer_data (every n-th).",
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
    transfer_data: str | None = None
    transfer_data_dir: str | None = None
    transfer_train_split: str = "train"
    transfer_val_split: str = "auto"
    transfer_test_split: str = "test"
    transfer_val_fraction: float = 0.2
    transfer_weight_decays: tuple[float, ...] = TRANSFER_WEIGHT_DECAYS
    transfer_max_iter: int = 1000
    transfer_blas_threads: int = 1
    transfer_max_examples: int | None = None


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
    transfer = _transfer_settings(fv, protocols)
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
        **transfer,
    )


def _transfer_settings(fv, protocols):
    """The transfer_* fields of `EvaluateConfig`, validated; ValueError naming the flag."""
    if "transfer" in protocols and not fv.transfer_data:
        raise ValueError(
            "--transfer_data is required by --protocols=transfer: an image folder, "
            "'tfds:NAME' or 'digits'."
        )
    try:
        decays = tuple(float(v) for v in fv.transfer_weight_decays)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"--transfer_weight_decays must be a list of numbers, got {fv.transfer_weight_decays}."
        ) from err
    if not decays or not all(math.isfinite(v) and v > 0 for v in decays):
        raise ValueError(
            f"--transfer_weight_decays must be positive numbers, got {fv.transfer_weight_decays}."
        )
    if not 0.0 < fv.transfer_val_fraction < 1.0:
        raise ValueError(
            f"--transfer_val_fraction must be in (0, 1), got {fv.transfer_val_fraction}."
        )
    _positive("transfer_max_iter", fv.transfer_max_iter)
    if fv.transfer_blas_threads < 0:
        raise ValueError(
            f"--transfer_blas_threads must be >= 0 (0: all cores), got {fv.transfer_blas_threads}."
        )
    _positive("transfer_max_examples", fv.transfer_max_examples, allow_none=True)
    splits = {}
    for name in ("transfer_train_split", "transfer_val_split", "transfer_test_split"):
        splits[name] = fv[name].value.strip()
        if not splits[name]:
            raise ValueError(f"--{name} must not be empty.")
    if splits["transfer_train_split"] == splits["transfer_test_split"]:
        raise ValueError(
            f"--transfer_test_split={splits['transfer_test_split']} is the training split; "
            "the classifier would be scored on its own training data."
        )
    val = splits["transfer_val_split"]
    if val in (splits["transfer_train_split"], splits["transfer_test_split"]):
        raise ValueError(
            f"--transfer_val_split={val} is also the train or test split; name another split, "
            "'auto' or 'from_train'."
        )
    data = fv.transfer_data
    if data and not (data == "digits" or data.startswith(("tfds:", "folder:"))):
        data = os.path.abspath(os.path.expanduser(data))
    return dict(
        transfer_data=data or None,
        transfer_data_dir=fv.transfer_data_dir,
        transfer_val_fraction=fv.transfer_val_fraction,
        transfer_weight_decays=decays,
        transfer_max_iter=fv.transfer_max_iter,
        transfer_blas_threads=fv.transfer_blas_threads,
        transfer_max_examples=fv.transfer_max_examples,
        **splits,
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
    """What `kd_keras.cache_teacher` writes: the views of `data` and `seed` for `epochs`.

    `workdir` is the training run whose `recipe:` teachers are cached (None: no recipes).
    """

    cache_dir: str
    teachers: tuple[str, ...]
    epochs: int = 10
    shard_size: int = 65536
    batch_size: int = 256
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    workdir: str | None = None


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
        # The views are the training run's: every data flag except the evaluation split and
        # the shuffle buffer (caches are written in file order).
        data=_section(
            DataConfig,
            fv.flag_values_dict(),
            eval_split=None,
            shuffle_buffer=DataConfig.shuffle_buffer,
        ),
        workdir=fv.workdir,
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
