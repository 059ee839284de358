"""The method registry: what the rest of kd_keras needs to know about each `--method`.

Every method declares one `MethodSpec` in its own declaration module (`kd_keras/methods/
*_spec.py`) and registers it with `register`. The declaration modules import no TensorFlow:
the builder and the other hooks are named as "module:function" strings (or given as
callables) and imported only when a run uses them, so `kd_keras.config` can read the
registry (the `--method` choices, which methods need a teacher, ...) without TensorFlow.

Who reads what:
  config.py   `names()` (the --method choices), `needs_teacher`, `can_cache_teacher`,
              `views` (which view flags apply), `needs_labels`, `flag_defaults`,
              `optimizers`, the method's own flags (`define_flags`, `options`, `validate`).
  train.py    `views` (data pipeline), `builder`, `frozen_teacher`, `teacher_features`,
              `callbacks`, `validate_each_epoch`, `nan_hint`, `knn_networks`,
              `knn_random_init`, `exporter`.
  evaluate    `build` (rebuilding a model from a checkpoint, with `frozen_teacher`).

Adding a method
---------------
1. Its module with the keras.Model (subclass of `kd_keras.methods.base.Method`) and a builder
   `build_<name>(ctx)` taking a `BuildContext` (see below), e.g. in `kd_keras/methods/foo.py`.
2. Its declaration `kd_keras/methods/foo_spec.py`:

       from kd_keras.methods import registry

       registry.register(registry.MethodSpec(
           name="foo",
           summary="one line for --helpfull",
           builder="kd_keras.methods.foo:build_foo",
           views="pair",                   # "single", "pair" (--aug_mode) or "multicrop"
           needs_teacher=True, teacher_features=True, can_cache_teacher=True,
           define_flags=define_foo_flags,  # defines --foo_* with absl (below)
           options=FooOptions,             # frozen dataclass: one field per own flag
           validate=validate_foo,          # raises ValueError naming the flag
       ))

   (any `kd_keras/methods/*_spec.py` is imported by the registry; nothing else to edit).
3. A flagfile `flags/foo.cfg`, its tests, its README row.

A method's own flags: `define_flags(flags)` gets the absl `flags` module and defines them
(called once, by `config.define_flags`); `options` is a frozen dataclass whose field names
are those flag names (defaults as the flags' defaults). `config.config_from_flags` fills it
from the parsed flags into `cfg.method_options` (a plain dict, saved in config.json) and the
builder reads `ctx.options` (the dataclass). Validation comes in two parts: `validate(cfg)`
checks the method's own values on the built `Config` (raise `ValueError("--foo_bank must be
..., got ...")`: the CLI prints that one line and exits 2); and the registry itself rejects
a method's own flag given (different from its default) for another method, naming the flag,
so no flag is ever silently ignored.
"""

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

VIEW_KINDS = ("single", "pair", "multicrop")
DEFAULT_NAN_HINT = "Try a lower --lr."

# Declaration modules imported (in this order, which is --method's) by the first registry
# query; every other `kd_keras/methods/*_spec.py` is imported after them, by name. A method
# added by a test or a plug-in may also call `register` itself (`config.register_method`).
DECLARATIONS = (
    "kd_keras.methods.simreg_spec",
    "kd_keras.methods.supervised_spec",
    "kd_keras.methods.clustering_spec",
    "kd_keras.methods.compress_spec",
    "kd_keras.methods.seed_spec",
    "kd_keras.methods.crd_spec",
)

Hook = str | Callable | None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything kd_keras needs to know about one `--method`.

    Attributes:
      name: the `--method` value.
      builder: "module:function" or callable, `(BuildContext) -> keras.Model` (un-compiled).
      summary: one line describing the method (for --method's help).
      views: "single" (one augmented view, key "student"), "pair" (student + teacher views,
        one image with --aug_mode=same) or "multicrop" ({"large", "small"}: SwAV crops).
      needs_teacher: the method needs at least one --teacher.
      teacher_features: its --teacher are feature extractors loaded by kd_keras.teachers and
        handed to the builder as `ctx.teachers` (k-NN reports each as teacher_<name>).
      can_cache_teacher: its train step can read --teacher_cache features instead.
      frozen_teacher: "module:function" or callable `(cfg) -> object` loading a frozen
        network for the builder (`ctx.frozen`), e.g. oss_offline's SwAV teacher.
      needs_labels: the training split must be labelled (supervised).
      flag_defaults: {flag name: value} used instead of the flag's global default when the
        flag is given neither on the command line nor in a flagfile.
      optimizers: the --optimizer values the method can be trained with.
      callbacks: "module:function" or callable `(cfg) -> list of keras callbacks`, placed
        before TensorBoard (so their epoch logs are written).
      validate_each_epoch: run `test_step` on the evaluation split after each epoch.
      nan_hint: the advice NaNGuard prints when the loss becomes non-finite.
      knn_networks: "module:function" or callable `(method) -> {name: network}`: networks
        besides the student that the final k-NN evaluation reports.
      knn_random_init: also report the k-NN of a randomly initialised student.
      exporter: "module:function" or callable `(cfg, method, workdir) -> Export`; default:
        the student backbone (and the method's `heads`, if any).
      define_flags: callable `(absl.flags) -> None` defining the method's own flags.
      options: frozen dataclass of the method's own flags (field names = flag names).
      validate: callable `(config.Config) -> None` raising ValueError naming a flag.
      unused_flags: callable `(config.Config) -> {flag name: reason}`: shared flags this
        configuration of the method does not read; config rejects each one that was given.
    """

    name: str
    builder: str | Callable
    summary: str = ""
    views: str = "pair"
    needs_teacher: bool = False
    teacher_features: bool = False
    can_cache_teacher: bool = False
    frozen_teacher: Hook = None
    needs_labels: bool = False
    flag_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizers: tuple[str, ...] = ("sgd", "lars")
    callbacks: Hook = None
    validate_each_epoch: bool = True
    nan_hint: str = DEFAULT_NAN_HINT
    knn_networks: Hook = None
    knn_random_init: bool = True
    exporter: Hook = None
    define_flags: Callable | None = None
    options: type | None = None
    validate: Callable | None = None
    unused_flags: Callable | None = None

    def __post_init__(self):
        if self.views not in VIEW_KINDS:
            raise ValueError(f"method {self.name!r}: views must be in {VIEW_KINDS}.")
        if self.can_cache_teacher and not self.teacher_features:
            raise ValueError(f"method {self.name!r}: a teacher cache needs teacher_features.")
        if self.options is not None and not dataclasses.is_dataclass(self.options):
            raise ValueError(f"method {self.name!r}: options must be a dataclass.")

    @property
    def multicrop(self):
        return self.views == "multicrop"

    def own_flags(self):
        """Names of the flags this method defines (its `options` fields)."""
        if self.options is None:
            return ()
        return tuple(f.name for f in dataclasses.fields(self.options))

    def make_options(self, values):
        """The `options` dataclass from a {flag name: value} dict (None without options)."""
        if self.options is None:
            return None
        known = set(self.own_flags())
        return self.options(**{k: v for k, v in dict(values or {}).items() if k in known})


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a builder gets.

    Attributes:
      cfg: the run's `config.Config`.
      student: the student backbone, images [B, H, W, 3] -> features [B, m].
      teachers: the loaded `kd_keras.teachers.loading.Teacher`s (methods with teacher_features).
      num_classes: classes of the training split (0 when unknown / unlabelled).
      steps_per_epoch: optimizer steps per epoch (schedules inside the method).
      frozen: what the spec's `frozen_teacher` loaded, else None.
      weight_decay: the coupled L2 the method adds through its loss (0 under LARS, which
        decays itself; see `kd_keras.optim.optimizers.coupled_weight_decay`).
      options: the method's own options dataclass (None without options).
    """

    cfg: Any
    student: Any
    teachers: tuple = ()
    num_classes: int = 0
    steps_per_epoch: int = 1
    frozen: Any = None
    weight_decay: float = 0.0
    options: Any = None


@dataclasses.dataclass(frozen=True)
class Export:
    """What an exporter returns: the backbone to export, its name, extra results entries."""

    backbone: Any
    backbone_name: str
    heads: Any = None
    results: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_SPECS = {}
_LOADED = False


def register(spec, replace=False):
    """Adds `spec` to the registry; returns it. A name is registered once unless `replace`."""
    if spec.name in _SPECS and not replace and _SPECS[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is registered already.")
    _SPECS[spec.name] = spec
    return spec


def unregister(name):
    """Removes a method (tests that register a throw-away one)."""
    _SPECS.pop(name, None)


def _load_declarations():
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    found = sorted(
        f"{__package__}.{m.name}"
        for m in pkgutil.iter_modules([os.path.dirname(__file__)])
        if m.name.endswith("_spec")
    )
    for module in (*DECLARATIONS, *(m for m in found if m not in DECLARATIONS)):
        importlib.import_module(module)


def names():
    """The registered --method names, in registration order."""
    _load_declarations()
    return tuple(_SPECS)


def specs():
    """All registered specs, in registration order."""
    _load_declarations()
    return tuple(_SPECS.values())


def get(name):
    """The `MethodSpec` of `name`.

    Raises:
      ValueError: naming --method, for an unknown method (never a silent fallback).
    """
    _load_declarations()
    if name not in _SPECS:
        raise ValueError(f"--method={name}: unknown method; registered: {names()}.")
    return _SPECS[name]


def where(predicate):
    """Names of the methods whose spec satisfies `predicate`."""
    return tuple(s.name for s in specs() if predicate(s))


def resolve(hook):
    """A hook given as "module:function" imported now; callables and None pass through."""
    if hook is None or callable(hook):
        return hook
    module, _, attr = hook.partition(":")
    if not attr:
        raise ValueError(f"hook {hook!r} must read 'module:function'.")
    return getattr(importlib.import_module(module), attr)


def build(spec, ctx):
    """The un-compiled keras.Model of `spec` for `ctx` (a `BuildContext`)."""
    return resolve(spec.builder)(ctx)


def build_student(cfg, input_size):
    """The student backbone of `cfg` (multi-crop methods take crops of any side)."""
    from kd_keras.nets import backbones, vit

    if cfg.model.student in vit.STUDENTS:
        if get(cfg.method).multicrop:
            raise ValueError(
                f"--student={cfg.model.student}: a ViT student takes one image size; "
                f"--method={cfg.method} feeds crops of several sizes."
            )
        return vit.build_student(cfg.model.student, input_size, cfg.model.student_norm)
    return backbones.build_backbone(
        cfg.model.student,
        input_size,
        small_stem=cfg.model.small_stem,
        norm=cfg.model.student_norm,
        sync_bn=cfg.sync_bn,
        any_input_size=get(cfg.method).multicrop,
    )


def build_method(cfg, student, teachers=(), num_classes=0, steps_per_epoch=1, frozen=None):
    """The un-compiled keras.Model of `cfg.method` around `student`: training and rebuilding
    a run from its checkpoint (evaluation) both come here.

    Args:
      cfg: `config.Config`.
      student: from `build_student`.
      teachers: loaded feature teachers (methods with `teacher_features`).
      num_classes: classes of the training split (supervised).
      steps_per_epoch: optimizer steps per epoch.
      frozen: what the spec's `frozen_teacher` loads; None loads it here when it has one.
    Raises:
      ValueError: naming --method when it is not registered.
    """
    from kd_keras.optim import optimizers

    spec = get(cfg.method)
    if frozen is None and spec.frozen_teacher is not None:
        frozen = resolve(spec.frozen_teacher)(cfg)
    ctx = BuildContext(
        cfg=cfg,
        student=student,
        teachers=tuple(teachers),
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        frozen=frozen,
        weight_decay=optimizers.coupled_weight_decay(cfg.optim),
        options=spec.make_options(cfg.method_options),
    )
    return build(spec, ctx)
