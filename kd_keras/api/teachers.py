"""Teachers from what a Keras programmer has: a keras.Model, a list or dict of them, a spec
string as on the command line (`kd_keras.train --teacher`), or an already loaded teacher."""

import warnings

import keras
import numpy as np
import tensorflow as tf

from kd_keras.teachers.loading import Teacher, TeacherSpec, load_teacher

TEACHER_INPUTS = ("unit", "imagenet", "minus_one_one")
DEFAULT_IMAGE_SIZE = 224


class _CallableInputTeacher(Teacher):
    """A Teacher whose input conversion is the user's function of [0, 1] images."""

    def __init__(self, spec, model, image_size, convert):
        self._convert = convert
        super().__init__(spec, model, image_size)

    def _preprocess(self, images):
        return self._convert(tf.cast(images, tf.float32))


def _check_teacher_input(teacher_input):
    if callable(teacher_input) or teacher_input in TEACHER_INPUTS:
        return teacher_input
    raise ValueError(
        f"teacher_input={teacher_input!r}: use one of {TEACHER_INPUTS} (the value range the "
        "teacher expects, from images in [0, 1]) or a function of the [0, 1] images."
    )


def _check_pooled(model, name, image_size):
    """Runs `model` once on zeros: a 4-D output is one clear error suggesting pooling."""
    out = model(tf.zeros([2, image_size, image_size, 3]), training=False)
    if isinstance(out, dict) or isinstance(out, (list, tuple)):
        return
    if len(out.shape) == 4:
        raise ValueError(
            f"teacher {name!r} outputs feature maps of shape {tuple(out.shape)}; kd_keras "
            "needs pooled features [batch, dim]. Build it with pooling='avg' (keras.applications) "
            "or end it with keras.layers.GlobalAveragePooling2D()."
        )
    if len(out.shape) != 2:
        raise ValueError(
            f"teacher {name!r} outputs shape {tuple(out.shape)}; kd_keras needs [batch, dim]."
        )


def _from_model(model, name, teacher_input, image_size):
    _check_pooled(model, name, image_size)
    if callable(teacher_input):
        spec = TeacherSpec("keras", "", name, "unit")
        return _CallableInputTeacher(spec, model, image_size, teacher_input)
    return Teacher(TeacherSpec("keras", "", name, teacher_input), model, image_size)


def _named(teacher, teachers):
    """[(name or None, item)] from the `teacher=` / `teachers=` arguments."""
    if teacher is not None and teachers is not None:
        raise ValueError("Give either teacher= or teachers=, not both.")
    given = teacher if teacher is not None else teachers
    if given is None:
        return []
    if isinstance(given, dict):
        return [(str(k), v) for k, v in given.items()]
    if isinstance(given, (list, tuple)):
        return [(None, v) for v in given]
    return [(None, given)]


def resolve_teachers(teacher=None, teachers=None, teacher_input="unit", image_size=None):
    """The frozen `Teacher`s of the arguments, in order.

    Args:
      teacher / teachers: a keras.Model with a pooled output [B, d], a spec string as on the
        command line (e.g. "keras:/path/model.keras", "app:ResNet50", "torch:/path/ckpt.pth"),
        a `kd_keras.teachers.loading.Teacher`, or a list / {name: ...} dict of those.
      teacher_input: how a plain keras.Model wants its images: "unit" ([0, 1]), "imagenet"
        (mean/std normalised), "minus_one_one", or a function of the [0, 1] images.
      image_size: side of the images the teachers will see (for probing their output).
    Returns:
      tuple of `Teacher`, names unique (a plain model is named after its position or key).
    """
    teacher_input = _check_teacher_input(teacher_input)
    size = int(image_size or DEFAULT_IMAGE_SIZE)
    out = []
    for index, (name, item) in enumerate(_named(teacher, teachers)):
        default = name or (f"t{index}" if index else "teacher")
        if isinstance(item, Teacher):
            out.append(item)
        elif isinstance(item, str):
            try:
                loaded = load_teacher(item, size, index=index)
            except (ValueError, FileNotFoundError) as err:
                # The loader speaks in command-line terms; here the argument is teacher=.
                raise type(err)(str(err).replace("--teacher", "teacher")) from None
            if name:
                loaded.name = name
            out.append(loaded)
        elif isinstance(item, keras.Model) or callable(item) and hasattr(item, "weights"):
            out.append(_from_model(item, default, teacher_input, size))
        else:
            raise TypeError(
                f"teacher {default!r} is a {type(item).__name__}; give a keras.Model, a spec "
                "string (e.g. 'keras:/path/model.keras'), or a list / dict of those."
            )
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}; pass a dict {{name: model}}.")
    return tuple(out)


def warn_if_degenerate(teacher, images):
    """Warns when `teacher`'s features of `images` are near zero or the same for every image:
    a distillation loss then sits at a constant (e.g. SimReg's 1.0) without learning."""
    features = np.asarray(teacher(images), np.float64)
    scale = float(np.max(np.abs(features))) if features.size else 0.0
    if scale < 1e-6:
        warnings.warn(
            f"teacher {teacher.name!r} gives features of magnitude {scale:.1e} on the first "
            "batch (near zero): is it trained, and does teacher_input match what it expects?",
            stacklevel=3,
        )
    elif len(features) > 1 and float(np.max(np.std(features, axis=0))) < 1e-6 * scale:
        warnings.warn(
            f"teacher {teacher.name!r} gives the same features for every image of the first "
            "batch: is it trained, and does teacher_input match what it expects?",
            stacklevel=3,
        )
