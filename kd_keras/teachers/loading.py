"""Frozen teachers loaded from local files, with their input conventions.

A teacher spec is a string, either a bare location or comma-separated `key=value` options:

  /runs/teacher                     a previous kd_keras run directory (uses its exported backbone)
  /models/moco                      a SavedModel directory (signature `serving_default`)
  /models/swav.keras                a Keras 3 model file
  app:ResNet50=/weights/r50.h5      a `keras.applications` architecture + a local weights file
  torch:resnet50=/ckpt/moco.pth.tar a published checkpoint (torch .pth, .safetensors or a TF
                                    checkpoint), converted by kd_keras.convert on first use and
                                    cached under <workdir>/converted_teachers/<sha256>/
  /teachers/moco_v2                 a directory written by `python -m kd_keras.convert`
  path=/models/m.keras,norm=imagenet,name=moco,size=224

Options:
  path   the location (or the first positional part of the spec).
  name   name used in logs and metrics (default: derived from the path).
  norm   what the teacher expects as input: "unit" ([0, 1] images, default for files and runs:
         kd_keras models normalise internally), "imagenet" (mean/std), "minus_one_one",
         "native" (the keras.applications model's own preprocess_input; default for app:).
  size   resize views to size x size before the teacher (default: no resize).
  pool   "avg" to global-average-pool a 4-D [B, h, w, d] output into features. For a torch:
         ViT teacher the features of the converted model: "cls" (default, the class token after
         the final norm), "avg" (mean of the normed patch tokens) or "cls_avg" (both).
  output key of a dict-valued output (SavedModel signatures return dicts).
  layout torch: only, the checkpoint layout (default: detected; see kd_keras.layouts).
  For torch: teachers `norm` is the normalisation built into the converted model (default:
  the layout's, ImageNet mean/std or none for SimCLR); the teacher then takes [0, 1] images.

Nothing here downloads: `app:` requires a weights file that exists. A path that does not exist
is an error (FileNotFoundError naming --teacher), never a silent fallback.
"""

import dataclasses
import json
import os
import zipfile

import keras
import tensorflow as tf

from kd_keras.nets import backbones

RUN_CONFIG = "config.json"
RUN_BACKBONE = os.path.join("export", "backbone.keras")
CONVERTED_MANIFEST = "manifest.json"
CONVERTED_BACKBONE = "backbone.keras"
CONVERTED_CACHE = "converted_teachers"

# keras.applications constructors -> module holding their preprocess_input.
_APP_PREPROCESS = {
    "ResNet50": "resnet",
    "ResNet101": "resnet",
    "ResNet152": "resnet",
    "ResNet50V2": "resnet_v2",
    "ResNet101V2": "resnet_v2",
    "ResNet152V2": "resnet_v2",
    "MobileNetV2": "mobilenet_v2",
    "MobileNetV3Small": "mobilenet_v3",
    "MobileNetV3Large": "mobilenet_v3",
    "EfficientNetB0": "efficientnet",
    "EfficientNetB1": "efficientnet",
    "EfficientNetB2": "efficientnet",
    "EfficientNetB3": "efficientnet",
    "EfficientNetB4": "efficientnet",
    "EfficientNetV2S": "efficientnet_v2",
    "EfficientNetV2M": "efficientnet_v2",
    "ConvNeXtTiny": "convnext",
    "ConvNeXtSmall": "convnext",
    "ConvNeXtBase": "convnext",
    "DenseNet121": "densenet",
    "VGG16": "vgg16",
    "VGG19": "vgg19",
    "Xception": "xception",
    "InceptionV3": "inception_v3",
}
_NORMS = ("unit", "imagenet", "minus_one_one", "native")
_OPTIONS = ("path", "name", "norm", "size", "pool", "output", "layout")
# Features a converted ViT can compute besides "avg" (kd_keras.nets.vit.POOLS).
_VIT_POOLS = ("cls", "cls_avg")


def recipe_dir(workdir, recipe):
    """Where a run trains (and later runs find) its `recipe:<recipe>` teacher."""
    return os.path.join(workdir, f"teacher_{recipe}")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A parsed --teacher value."""

    kind: str  # "run", "savedmodel", "keras", "app", "recipe", "converted" or "torch"
    path: str
    name: str
    norm: str = "unit"
    size: int | None = None
    pool: str | None = None
    output: str | None = None
    app: str | None = None  # keras.applications constructor for kind "app"
    recipe: str | None = None  # recipe name for kind "recipe"
    arch: str | None = None  # ResNet architecture for kind "torch"
    layout: str | None = None  # checkpoint layout for kind "torch" (None: detect)


def parse_teacher_spec(spec, index=0):
    """Parses one --teacher string into a `TeacherSpec` (no file access beyond existence).

    Raises:
      ValueError: malformed spec or unknown option.
      FileNotFoundError: the location does not exist.
    """
    if not spec or not spec.strip():
        raise ValueError("--teacher is empty.")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    options = {}
    for i, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if i == 0 and (not sep or key.startswith(("app:", "torch:")) or key not in _OPTIONS):
            options["path"] = part
            continue
        if not sep or key not in _OPTIONS:
            raise ValueError(
                f"--teacher={spec!r}: cannot parse {part!r}; options are {_OPTIONS} as key=value."
            )
        options[key] = value
    location = options.get("path")
    if not location:
        raise ValueError(f"--teacher={spec!r} names no path.")
    norm = options.get("norm")
    if norm is not None and norm not in _NORMS:
        raise ValueError(f"--teacher={spec!r}: norm must be one of {_NORMS}, got {norm!r}.")
    size = options.get("size")
    if size is not None:
        try:
            size = int(size)
        except ValueError as err:
            raise ValueError(f"--teacher={spec!r}: size must be an integer.") from err
        if size <= 0:
            raise ValueError(f"--teacher={spec!r}: size must be positive.")
    pool = options.get("pool")
    if pool not in (None, "avg", *_VIT_POOLS):
        raise ValueError(f"--teacher={spec!r}: pool must be one of {('avg', *_VIT_POOLS)}.")
    if pool in _VIT_POOLS and not _is_vit_torch(location):
        raise ValueError(f"--teacher={spec!r}: pool={pool} applies to torch: ViT teachers only.")
    common = dict(size=size, pool=pool, output=options.get("output"))
    if options.get("layout") is not None and not location.startswith("torch:"):
        raise ValueError(f"--teacher={spec!r}: layout= applies to torch: teachers only.")

    if location.startswith("torch:"):
        return _parse_torch_spec(spec, location, options, norm, common)

    if location.startswith("recipe:"):
        recipe = location.split(":", 1)[1]
        name = _safe_name(options.get("name", f"recipe_{recipe}"))
        return TeacherSpec("recipe", "", name, norm or "unit", recipe=recipe, **common)
    if location.startswith("app:"):
        return _parse_app_spec(spec, location, options, norm, common)

    path = os.path.abspath(os.path.expanduser(location))
    if not os.path.exists(path):
        raise FileNotFoundError(f"--teacher: {path} does not exist.")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, RUN_CONFIG)):
        kind = "run"
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        kind = "savedmodel"
    elif os.path.isfile(path) and path.endswith(".keras"):
        kind = "keras"
    elif _is_converted_dir(path):
        kind = "converted"
    else:
        raise ValueError(
            f"--teacher: {path} is neither a kd_keras run directory (with {RUN_CONFIG}), a "
            "SavedModel directory (with saved_model.pb), a .keras file nor a directory written "
            "by kd_keras.convert (with manifest.json and backbone.keras); for a .pth/.safetensors/"
            "TF checkpoint use torch:ARCH=PATH."
        )
    if norm == "native":
        raise ValueError(f"--teacher={spec!r}: norm=native applies to app: teachers only.")
    default_name = os.path.basename(path.rstrip("/")).removesuffix(".keras") or f"t{index}"
    name = options.get("name", default_name)
    return TeacherSpec(kind, path, _safe_name(name), norm or "unit", **common)


def _parse_app_spec(spec, location, options, norm, common):
    """The `TeacherSpec` of `app:NAME=/path/weights.h5` (a keras.applications architecture)."""
    app, sep, weights = location[4:].partition("=")
    if not sep or not weights:
        raise ValueError(
            f"--teacher={spec!r}: use app:NAME=/path/to/weights.h5 (a local weights file; "
            "kd_keras never downloads weights implicitly)."
        )
    if not hasattr(keras.applications, app):
        raise ValueError(f"--teacher={spec!r}: keras.applications has no {app!r}.")
    weights = os.path.abspath(os.path.expanduser(weights))
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--teacher: weights file {weights} does not exist.")
    if norm in (None, "native") and app not in _APP_PREPROCESS:
        raise ValueError(
            f"--teacher={spec!r}: no known preprocessing for {app}; give norm=... explicitly."
        )
    name = _safe_name(options.get("name", app.lower()))
    return TeacherSpec("app", weights, name, norm or "native", app=app, **common)


def _is_converted_dir(path):
    return os.path.isfile(os.path.join(path, CONVERTED_MANIFEST)) and os.path.isfile(
        os.path.join(path, CONVERTED_BACKBONE)
    )


def _parse_torch_spec(spec, location, options, norm, common):
    from kd_keras.nets import backbones
    from kd_keras.teachers import checkpoint_io, layouts

    arch, sep, checkpoint = location[len("torch:") :].partition("=")
    if not sep or not arch or not checkpoint:
        raise ValueError(
            f"--teacher={spec!r}: use torch:ARCH=/path/to/checkpoint (e.g. "
            "torch:resnet50=/ckpt/swav_800ep_pretrain.pth.tar)."
        )
    known_layouts = layouts.LAYOUT_NAMES
    try:
        if _is_vit_torch(location):
            from kd_keras.nets import vit
            from kd_keras.teachers import vit_layouts

            vit.parse_vit_arch(arch)
            known_layouts = vit_layouts.VIT_LAYOUT_NAMES
        else:
            backbones.parse_arch(arch)
    except ValueError as err:
        raise ValueError(f"--teacher={spec!r}: {err}") from err
    layout = options.get("layout")
    if layout is not None and layout not in known_layouts:
        raise ValueError(
            f"--teacher={spec!r}: layout must be one of {known_layouts}, got {layout!r}."
        )
    if norm is not None and norm not in backbones.NORM_MODES:
        raise ValueError(
            f"--teacher={spec!r}: norm for a torch: teacher is the normalisation built into the "
            f"converted model, one of {backbones.NORM_MODES}."
        )
    checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    if not checkpoint_io.checkpoint_exists(checkpoint):
        raise FileNotFoundError(f"--teacher: checkpoint {checkpoint} does not exist.")
    base = os.path.basename(checkpoint.rstrip("/"))
    for suffix in (".tar", ".pth", ".pt", ".safetensors", ".ckpt"):
        base = base.removesuffix(suffix)
    name = _safe_name(options.get("name", base or arch))
    # `norm` travels in the spec as the converted model's own normalisation; the teacher
    # itself is fed [0, 1] images ("unit").
    return TeacherSpec(
        "torch", checkpoint, name, norm or "layout", arch=arch, layout=layout, **common
    )


def _is_vit_torch(location):
    from kd_keras.nets import vit

    arch = location[len("torch:") :].partition("=")[0] if location.startswith("torch:") else ""
    return vit.is_vit_arch(arch)


def converted_dir(spec, workdir=None, image_size=None):
    """Converts a torch: teacher on first use; returns the converted directory.

    The directory is `<workdir>/converted_teachers/<sha256 of the file>-<arch>[-<layout>]
    [-<norm>]`, reused when its manifest records the same sha256 (a file changed in place
    gets a new directory). Without a workdir the cache is
    $KD_KERAS_CACHE (default ~/.cache/kd_keras)/converted_teachers.

    A ViT is converted for one input side (spec.size, else `image_size`, else the
    checkpoint's own): its positional embeddings are resized once, here; the side and the
    pooling are part of the directory name (`-s<side>-<pool>`).
    """
    from kd_keras.teachers import checkpoint_io
    from kd_keras.teachers import conversion as convert

    root = workdir or os.environ.get(
        "KD_KERAS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kd_keras")
    )
    sha = checkpoint_io.file_sha256(checkpoint_io.source_files(spec.path))
    parts = [sha, _safe_name(spec.arch)]
    if spec.layout:
        parts.append(spec.layout)
    if spec.norm != "layout":
        parts.append(spec.norm)
    vit_options = {}
    if _is_vit_torch(f"torch:{spec.arch}="):
        side = spec.size or image_size
        vit_options = {"image_size": side, "pool": spec.pool or "cls"}
        parts += [f"s{side or 'native'}", vit_options["pool"]]
    out = os.path.join(root, CONVERTED_CACHE, "-".join(parts))
    manifest = convert.read_manifest(out) if os.path.isdir(out) else None
    if manifest is not None and manifest["source"]["sha256"] == sha:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    convert.convert(
        convert.ConvertConfig(
            checkpoint=spec.path,
            out=out,
            arch=spec.arch,
            layout=spec.layout,
            norm=None if spec.norm == "layout" else spec.norm,
            overwrite=True,
            **vit_options,
        )
    )
    return out


def _safe_name(name):
    # Used in metric and layer names, which accept only [A-Za-z0-9_].
    cleaned = "".join(c if c.isalnum() else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"t_{cleaned}"


class Teacher:
    """A frozen feature extractor with its input convention.

    Calling it maps images float32 [B, H, W, 3] in [0, 1] to features float32 [B, d]; the
    model runs with training=False and outside any gradient.

    Attributes:
      name: str, used in metric names.
      feature_dim: int d.
      spec: the `TeacherSpec` it was loaded from.
    """

    def __init__(self, spec, model, image_size):
        self.spec = spec
        self.name = spec.name
        self.model = model
        if hasattr(model, "trainable"):
            model.trainable = False
        probe = self(tf.zeros([2, image_size, image_size, 3]))
        if probe.shape.rank != 2:
            raise ValueError(
                f"--teacher {spec.name!r} ({spec.path or spec.recipe}): output has shape "
                f"{probe.shape}, not a feature vector [batch, dim]; add pool=avg for a 4-D map."
            )
        self.feature_dim = int(probe.shape[-1])

    def _preprocess(self, images):
        images = tf.cast(images, tf.float32)
        if self.spec.size is not None:
            images = tf.image.resize(images, [self.spec.size, self.spec.size], antialias=True)
        if self.spec.kind == "torch":
            return images  # the converted model normalises inside
        if self.spec.norm == "native":
            module = getattr(keras.applications, _APP_PREPROCESS[self.spec.app])
            return module.preprocess_input(images * 255.0)
        return backbones.normalize_images(images, self.spec.norm)

    def __call__(self, images):
        out = self.model(self._preprocess(images), training=False)
        if isinstance(out, dict):
            if self.spec.output is not None:
                if self.spec.output not in out:
                    raise ValueError(
                        f"--teacher {self.name!r}: output={self.spec.output!r} not among the "
                        f"model's outputs {sorted(out)}."
                    )
                out = out[self.spec.output]
            elif len(out) == 1:
                out = next(iter(out.values()))
            else:
                raise ValueError(
                    f"--teacher {self.name!r} returns several outputs {sorted(out)}; "
                    "choose one with output=KEY."
                )
        out = tf.cast(out, tf.float32)
        if self.spec.pool == "avg" and out.shape.rank == 4:
            out = tf.reduce_mean(out, axis=[1, 2])
        return tf.stop_gradient(out)


def load_teacher(spec, image_size, index=0, workdir=None):
    """Loads a frozen `Teacher` from a spec string or `TeacherSpec`.

    Args:
      spec: str or TeacherSpec (kind "recipe" must be resolved to a run directory first).
      image_size: side of the views the teacher will receive (used to probe its output).
      index: position of the teacher among --teacher (default names).
      workdir: run directory under which torch: teachers are converted and cached (see
        `converted_dir`).
    Raises:
      FileNotFoundError / ValueError naming --teacher and the file.
    """
    if isinstance(spec, str):
        spec = parse_teacher_spec(spec, index)
    if spec.kind == "recipe":
        raise ValueError(
            f"--teacher recipe:{spec.recipe} must be trained before loading (kd_keras.train does)."
        )
    try:
        if spec.kind == "run":
            model = _load_keras_file(os.path.join(spec.path, RUN_BACKBONE), spec)
        elif spec.kind == "keras":
            model = _load_keras_file(spec.path, spec)
        elif spec.kind == "converted":
            _check_vit_size(spec, spec.size or image_size)
            model = _load_keras_file(os.path.join(spec.path, CONVERTED_BACKBONE), spec)
        elif spec.kind == "torch":
            model = _load_keras_file(
                os.path.join(converted_dir(spec, workdir, image_size), CONVERTED_BACKBONE), spec
            )
        elif spec.kind == "savedmodel":
            model = keras.layers.TFSMLayer(spec.path, call_endpoint="serving_default")
        else:
            size = spec.size or image_size
            constructor = getattr(keras.applications, spec.app)
            model = constructor(
                include_top=False, weights=spec.path, pooling="avg", input_shape=(size, size, 3)
            )
    except (OSError, ValueError, TypeError, KeyError, tf.errors.OpError) as err:
        reason = str(err).strip().splitlines()[0][:800] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--teacher: could not load {spec.path} as a {spec.kind}: {reason}"
        ) from err
    return Teacher(spec, model, image_size)


def _check_vit_size(spec, side):
    """A converted ViT has positional embeddings for one input side: refuse another one."""
    with open(os.path.join(spec.path, CONVERTED_MANIFEST)) as f:
        built_for = json.load(f).get("image_size")
    if built_for is not None and built_for != side:
        raise ValueError(
            f"a ViT converted for {built_for} px images cannot take {side} px ones; convert "
            f"again with --image_size={side}, add size={built_for} to resize the views, or use "
            "torch:ARCH=PATH (converted for the run's size)"
        )


def _load_keras_file(path, spec):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher: {path} does not exist (is the run finished?).")
    # Keras reports any file it cannot open as a zip as "File not found".
    if not zipfile.is_zipfile(path):
        raise ValueError("not a Keras model file (a .keras model is a zip archive, this is not)")
    from kd_keras.nets import vit  # noqa: F401  (registers the layers of converted ViTs)

    return keras.models.load_model(path, compile=False)


def run_image_size(run_dir):
    """The training image size recorded in a kd_keras run directory's config.json."""
    with open(os.path.join(run_dir, RUN_CONFIG)) as f:
        return int(json.load(f)["data"]["image_size"])
