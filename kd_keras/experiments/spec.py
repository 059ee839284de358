"""Experiment specs: a base flagfile plus named variants, read and validated before anything runs.

A spec is a small text file (`experiments/*.cfg`); `#` starts a comment line:

    [experiment]
    title = SimReg Table A1: prediction heads, backbone features
    base = flags/simreg_imagenette.cfg     # absl flagfile, relative to the working directory
    protocols = knn,linear                 # kd_keras.evaluate --protocols ("" = train's k-NN only)
    evaluate = --knn_votes=majority        # extra kd_keras.evaluate flags (repeatable)
    layers = backbone                      # --eval_layer values; one report row per layer
    cache_epochs = 10                      # cache the teachers once (0 = run them live)
    metric = knn/majority_k20_top1         # report column of the bar chart

    [scale cpu]                            # flags appended for --scale=cpu
    --epochs=5
    [scale gpu]
    --image_size=112

    [teacher moco]                         # a teacher trained once (supervised unless
    --student=resnet_small                 # it sets --method), used by variants as
    --seed=1                               # --teacher=teacher:moco

    [variant linear]                       # train flags on top of base + scale
    --head=linear
    [variant mlp4]
    --head=mlp4

A fair comparison adds seeds and a sweep (both optional):

    [experiment]
    ...
    seeds = 3                              # each variant trained 3 times (--seed, +1, +2)
    holdout = 10                           # the sweep's held-out percentage of the train split
    select = train_knn/top1_k20            # the sweep's selection column (higher is better)

    [sweep]                                # per variant: each candidate trained once on
    --lr=0.1,0.4,1.6                       # train@rest10, judged on train@holdout10
    --epochs=2                             # one value: the sweep's own (shorter) budget

Every variant runs the sweep's candidates (the product of the multi-valued lines) with the
single-valued lines on top, training on `<train split>@rest<holdout>` and measuring k-NN on
`<train split>@holdout<holdout>` (kd_keras.data.holdout), so the reported split is never used to
choose; the best candidate's values are then used by all of the variant's seeds. List-valued
flags (such as --knn_k) cannot be swept.

Flag lines are kd_keras.train flags, one per line, as in a flagfile (`--name=value`, `--name`,
`--noname`, `--name+=value` for repeated flags). `--workdir` belongs to the runner. A
`--teacher=recipe:supervised` (from the base or a variant) is trained once by the runner, from
the base + scale flags and the variant's flags in `RECIPE_TEACHER_FLAGS`, so variants that differ
in anything else (head, augmentation, optimiser) distil the very same teacher.

Every problem is a `SpecError` whose message starts with `<spec file>:<line>:`.
"""

import copy
import dataclasses
import os

from absl import flags

from kd_keras import config as config_lib

HEADER_KEYS = (
    "title", "base", "protocols", "evaluate", "layers", "cache_epochs", "metric", "seeds",
    "holdout", "select",
)
SECTION_KINDS = ("experiment", "scale", "teacher", "variant", "sweep")
# Sections written without a name.
UNNAMED_SECTIONS = ("experiment", "sweep")
DEFAULT_SELECT = "train_knn/top1_k20"
SCALES = ("cpu", "gpu")
# Flags the runner sets itself.
RESERVED_FLAGS = ("workdir", "flagfile", "teacher_cache")
# Flags of a variant that also define its recipe teacher (everything else only the student).
RECIPE_TEACHER_FLAGS = (
    "dataset", "data_dir", "download", "train_split", "eval_split", "image_size", "seed",
    "student_norm", "small_stem", "teacher_recipe_backbone", "teacher_recipe_epochs",
    "teacher_recipe_lr", "precision", "jit_compile", "strategy", "batch_size",
)
TEACHER_PREFIX = "teacher:"


class SpecError(ValueError):
    """A spec file problem, reported as `<file>:<line>: <what>`."""


@dataclasses.dataclass(frozen=True)
class FlagLine:
    """One `--flag=value` line of a spec section."""

    text: str
    line: int

    @property
    def name(self):
        return flag_name(self.text)


@dataclasses.dataclass(frozen=True)
class Section:
    """A `[teacher NAME]` or `[variant NAME]` section: its name, header line and flag lines."""

    name: str
    line: int
    flags: tuple[FlagLine, ...] = ()


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed experiment spec (see the module docstring for the file format)."""

    path: str
    base: str
    title: str = ""
    protocols: tuple[str, ...] = ("knn",)
    evaluate_flags: tuple[FlagLine, ...] = ()
    layers: tuple[str, ...] = ("backbone",)
    cache_epochs: int = 0
    metric: str = ""
    scales: dict = dataclasses.field(default_factory=dict)  # name -> tuple[FlagLine]
    teachers: dict = dataclasses.field(default_factory=dict)  # name -> Section
    variants: dict = dataclasses.field(default_factory=dict)  # name -> Section
    seeds: int = 1
    holdout: int = 10  # percent of the train split the sweep holds out
    select: str = DEFAULT_SELECT
    sweep: tuple[FlagLine, ...] = ()  # the [sweep] section's lines

    def sweep_grid(self):
        """(candidates, budget): every combination of the multi-valued [sweep] lines as a tuple
        of flag texts, and the single-valued lines (the sweep's own budget)."""
        axes, budget = [], []
        for fl in self.sweep:
            name, _, value = fl.text.partition("=")
            values = [v.strip() for v in value.split(",")] if value else [""]
            if len(values) > 1:
                axes.append([f"{name}={v}" for v in values])
            else:
                budget.append(fl.text)
        candidates = [()]
        for axis in axes:
            candidates = [(*c, v) for c in candidates for v in axis]
        return (candidates if axes else []), tuple(budget)

    @property
    def name(self):
        return os.path.splitext(os.path.basename(self.path))[0]

    def scale_flags(self, scale):
        return self.scales.get(scale, ())


def flag_name(text):
    """'head' for '--head=mlp4', 'teacher' for '--teacher+=x', 'nosync_bn' for '--nosync_bn'."""
    name = text.lstrip("-").split("=", 1)[0]
    return name[:-1] if name.endswith("+") else name


def train_flag_names():
    """Names of kd_keras.train's flags (the spec's flag lines must be among them)."""
    config_lib.define_flags()
    names = set(flags.FLAGS)
    return names - set(config_lib.experiment_flag_names()) - _evaluate_only_flag_names()


def evaluate_flag_names():
    """Names of kd_keras.evaluate's flags."""
    config_lib.define_evaluate_flags()
    return set(flags.FLAGS) - set(config_lib.experiment_flag_names())


def _evaluate_only_flag_names():
    config_lib.define_evaluate_flags()
    return {
        "model", "protocols", "knn_votes", "knn_temperature", "eval_layer", "linear_preset",
        "linear_path", "linear_epochs", "finetune_epochs", "finetune_batch_size",
        "eval_max_test", "eval_dir", "from_checkpoint", "projector_examples",
    }


def read_spec(path):
    """Parses and validates the spec file at `path`.

    Raises:
      SpecError: `<path>:<line>: <problem>` for the first problem found.
    """
    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such spec file.")
    with open(path) as f:
        lines = f.read().splitlines()
    header, scales, teachers, variants, sweep = _split_sections(path, lines)
    spec = _build_spec(path, header, scales, teachers, variants)
    spec = dataclasses.replace(spec, sweep=sweep, **_fairness(path, header))
    _check_flag_names(spec)
    _check_sweep(spec)
    return spec


def _whole_number(path, header, key, default, low, high):
    if key not in header:
        return default
    value, line = header[key]
    if not value.isdigit() or not low <= int(value) <= high:
        raise SpecError(f"{path}:{line}: {key} must be a whole number from {low} to {high}, "
                        f"got '{value}'.")
    return int(value)


def _fairness(path, header):
    """The seeds / holdout / select keys of [experiment]."""
    return {
        "seeds": _whole_number(path, header, "seeds", 1, 1, 100),
        "holdout": _whole_number(path, header, "holdout", 10, 1, 90),
        "select": header.get("select", (DEFAULT_SELECT, 0))[0] or DEFAULT_SELECT,
    }


def _check_sweep(spec):
    """A [sweep] needs at least one multi-valued line, and list flags cannot be swept."""
    if not spec.sweep:
        return
    candidates, _ = spec.sweep_grid()
    first = spec.sweep[0].line
    if not candidates:
        raise SpecError(f"{spec.path}:{first}: [sweep] has no line with several values, e.g. "
                        "--lr=0.1,0.4,1.6.")
    for fl in spec.sweep:
        if fl.name in RESERVED_FLAGS or fl.name in ("seed", "train_split", "eval_split"):
            raise SpecError(f"{spec.path}:{fl.line}: [sweep]: --{fl.name} is set by the runner "
                            "during a sweep.")
        flag = flags.FLAGS[fl.name] if "," in fl.text else None
        if flag is not None and (
            isinstance(flag, flags.MultiFlag) or isinstance(flag.parser, flags.ListParser)
        ):
            raise SpecError(f"{spec.path}:{fl.line}: [sweep]: --{fl.name} is a list flag and "
                            "cannot be swept; set it in the variants.")


def _split_sections(path, lines):
    header, scales, teachers, variants, sweep = {}, {}, {}, {}, []
    current = None  # (kind, name, line, list of FlagLine)
    sections = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        if text.startswith("["):
            current = _section_header(where, text, number)
            sections.append(current)
            continue
        if current is None:
            raise SpecError(f"{where}: '{text}' comes before any section; start with [experiment].")
        kind = current[0]
        if kind == "experiment":
            key, value = _key_value(where, text)
            if key == "evaluate":
                header.setdefault(key, []).append(FlagLine(value, number))
            elif key in header:
                raise SpecError(f"{where}: '{key}' is set twice in [experiment].")
            else:
                header[key] = (value, number)
        else:
            if not text.startswith("--"):
                raise SpecError(
                    f"{where}: expected a flag line such as --head=mlp4 in [{kind} "
                    f"{current[1]}], got '{text}'."
                )
            current[3].append(FlagLine(text, number))
    if not sections or sections[0][0] != "experiment":
        raise SpecError(f"{path}:1: a spec starts with an [experiment] section.")
    for kind, name, number, body in sections[1:]:
        where = f"{path}:{number}"
        if kind == "sweep":
            if sweep:
                raise SpecError(f"{where}: only one [sweep] section is allowed.")
            sweep = body or [FlagLine("", number)]
            continue
        target = {"scale": scales, "teacher": teachers, "variant": variants}.get(kind)
        if target is None:
            raise SpecError(f"{where}: only one [experiment] section is allowed.")
        if name in target:
            raise SpecError(f"{where}: [{kind} {name}] is defined twice.")
        target[name] = Section(name, number, tuple(body))
    return header, scales, teachers, variants, tuple(f for f in sweep if f.text)


def _section_header(where, text, number):
    if not text.endswith("]"):
        raise SpecError(f"{where}: a section header is [kind NAME], got '{text}'.")
    parts = text[1:-1].split()
    if not parts or parts[0] not in SECTION_KINDS:
        raise SpecError(f"{where}: unknown section '{text}'; kinds: {', '.join(SECTION_KINDS)}.")
    kind = parts[0]
    if kind in UNNAMED_SECTIONS:
        if len(parts) != 1:
            raise SpecError(f"{where}: [{kind}] takes no name.")
        return (kind, "", number, [])
    if len(parts) != 2:
        raise SpecError(f"{where}: [{kind}] needs exactly one name, e.g. [{kind} mlp4].")
    name = parts[1]
    if not all(c.isalnum() or c in "_-." for c in name):
        raise SpecError(f"{where}: [{kind} {name}]: names use letters, digits, '_', '-', '.'.")
    if kind == "scale" and name not in SCALES:
        raise SpecError(f"{where}: [scale {name}]: scales are {', '.join(SCALES)}.")
    return (kind, name, number, [])


def _key_value(where, text):
    if "=" not in text:
        raise SpecError(f"{where}: expected 'key = value' in [experiment], got '{text}'.")
    key, value = (part.strip() for part in text.split("=", 1))
    if key not in HEADER_KEYS:
        raise SpecError(f"{where}: unknown key '{key}'; keys: {', '.join(HEADER_KEYS)}.")
    return key, value


def _build_spec(path, header, scales, teachers, variants):
    if "base" not in header:
        raise SpecError(f"{path}:1: [experiment] needs 'base = <flagfile>'.")
    base, base_line = header["base"]
    if not os.path.isfile(base):
        raise SpecError(f"{path}:{base_line}: base flagfile {base} does not exist.")
    if not variants:
        raise SpecError(f"{path}:1: the spec defines no [variant NAME] section.")

    def listed(key, default):
        if key not in header:
            return default
        return tuple(v.strip() for v in header[key][0].split(",") if v.strip())

    protocols = listed("protocols", ("knn",))
    bad = [p for p in protocols if p not in config_lib.EVAL_PROTOCOLS]
    if bad:
        raise SpecError(
            f"{path}:{header['protocols'][1]}: unknown protocols {bad}; choose from "
            f"{config_lib.EVAL_PROTOCOLS}."
        )
    cache_epochs = 0
    if "cache_epochs" in header:
        value, line = header["cache_epochs"]
        if not value.isdigit():
            raise SpecError(f"{path}:{line}: cache_epochs must be an integer >= 0, got '{value}'.")
        cache_epochs = int(value)
    layers = listed("layers", ("backbone",)) or ("backbone",)
    return Spec(
        path=path,
        base=base,
        title=header.get("title", ("", 0))[0],
        protocols=protocols,
        evaluate_flags=tuple(header.get("evaluate", ())),
        layers=layers,
        cache_epochs=cache_epochs,
        metric=header.get("metric", ("", 0))[0],
        scales={name: section.flags for name, section in scales.items()},
        teachers=teachers,
        variants=variants,
    )


def _check_flag_names(spec):
    train_names = train_flag_names()
    eval_names = evaluate_flag_names()
    groups = [(f"[scale {n}]", fl) for n, fl in spec.scales.items()]
    groups += [(f"[teacher {n}]", s.flags) for n, s in spec.teachers.items()]
    groups += [(f"[variant {n}]", s.flags) for n, s in spec.variants.items()]
    groups += [("[sweep]", spec.sweep)]
    for where, lines in groups:
        for fl in lines:
            _check_one_flag(spec.path, where, fl, train_names, "kd_keras.train")
    for fl in spec.evaluate_flags:
        for text in fl.text.split():
            if flag_name(text) in ("model", "eval_dir", "eval_layer", "protocols"):
                raise SpecError(
                    f"{spec.path}:{fl.line}: evaluate: {text.split('=')[0]} is set by the runner "
                    "(use 'protocols' and 'layers')."
                )
            _check_one_flag(spec.path, "evaluate", FlagLine(text, fl.line), eval_names,
                            "kd_keras.evaluate")


def _check_one_flag(path, where, fl, names, cli):
    name = fl.name
    known = name in names or (name.startswith("no") and name[2:] in names)
    if not fl.text.startswith("--") or not known:
        raise SpecError(f"{path}:{fl.line}: {where}: {cli} has no flag --{name}.")
    if name in RESERVED_FLAGS:
        raise SpecError(f"{path}:{fl.line}: {where}: --{name} is set by the experiment runner.")


def parse_train_flags(argv, where):
    """Parses a train command line into a private copy of the flags; returns (FlagValues, Config).

    Raises:
      SpecError: `where: <problem>` when absl or `config_from_flags` rejects it.
    """
    config_lib.define_flags()
    fv = copy.deepcopy(flags.FLAGS)
    fv.unparse_flags()  # defaults only: nothing of the experiment's own command line leaks in
    try:
        fv(config_lib.expand_argv(["kd_keras.train", *argv], fv))
        cfg = config_lib.config_from_flags(fv)
    except (flags.Error, ValueError) as err:
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SpecError(f"{where}: {message.removeprefix('ERROR:: ')}") from err
    return fv, cfg
