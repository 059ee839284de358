"""The distillers of the Python API: kd_keras' methods built from plain keras.Models.

Each class here IS the method's keras.Model (a subclass of the one in `kd_keras.methods`,
trained by the same `train_step`), with a constructor in Python terms (`student=`,
`teacher=`, `head=` and the method's options with the papers' defaults) and a `fit` that
takes images, (images, labels), arrays or dict batches and makes the paper's views itself
on the host (`kd_keras.api.views`; `views=None` to give your own). `predict` returns the
student's features; the trained network to keep is `.student`, a plain keras.Model.
"""

import re
import warnings

import keras

from kd_keras.api import batches
from kd_keras.api import views as views_lib
from kd_keras.api.teachers import resolve_teachers, warn_if_degenerate
from kd_keras.methods import compress, crd, oss, seed, simreg, supervised, swav
from kd_keras.nets import clustering, heads

# The command line's defaults (kd_keras.config): SGD with momentum at --lr 0.05, coupled
# weight decay 1e-4, synchronised BatchNorm.
DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 1e-4
SYNC_BN = True
AUTO = "auto"
HOST, STEP = "host", "step"
VIEWS_IN = (HOST, STEP)  # where the default views are computed (docs/python_api.md)
IMAGENET_SIZE = 1_281_167  # the papers' bank sizes are relative to ImageNet's train split


def translate_flags(message, names):
    """A method's error message in Python terms: `--flag` -> the argument `names[flag]`."""
    return re.sub(r"--(\w+)", lambda m: names.get(m.group(1), m.group(1)), message)


class _Translated:
    """Re-raises a ValueError of the wrapped block with flags renamed to arguments."""

    def __init__(self, names):
        self.names = names

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is ValueError:
            raise ValueError(translate_flags(str(err), self.names)) from None
        return False


def _input_side(student, image_size):
    if image_size is not None:
        return int(image_size)
    side = student.input_shape[1]
    if side is None:
        raise ValueError(
            "the student takes images of any size: give image_size= (the side of the views)."
        )
    return int(side)


def _views(views, default):
    """views="auto" -> the paper's `Views`; None -> none; a `Views` or callable as given."""
    if isinstance(views, str) and views == AUTO:
        return default
    return views


def _head_for(head, student_dim, out_dim, name, hidden_dims=None):
    if head is None or isinstance(head, keras.Model):
        return head
    if isinstance(head, str):
        return heads.prediction_head(
            student_dim, out_dim, head, hidden_dims=hidden_dims, sync_bn=SYNC_BN, name=name
        )
    raise TypeError(
        f"head must be a name {heads.HEAD_KINDS}, a keras.Model or None; "
        f"got {type(head).__name__}."
    )


class _Distiller:
    """What every API class adds to its method (mixed in before the method class)."""

    _argument_names = {"batch_size": "batch_size"}

    def __init__(self, *args, views_in=STEP, **kwargs):
        if views_in not in VIEWS_IN:
            raise ValueError(f"views_in={views_in!r}: use one of {VIEWS_IN}.")
        super().__init__(*args, **kwargs)
        self._views_in = views_in

    def _setup(self, views, image_size, teachers=()):
        self._image_size = int(image_size)
        self._default_views = views
        # views_in="step": the batches carry the raw images and `train_step` makes the views.
        self._step_views = views if self._views_in == STEP else None
        self._api_teachers = tuple(teachers)
        self._checked_teachers = False

    def compile(self, optimizer=None, **kwargs):
        """As keras.Model.compile; without an optimizer the command line's SGD(lr 0.05,
        momentum 0.9) (its batch scaling and cosine schedule are not applied)."""
        if optimizer is None:
            optimizer = keras.optimizers.SGD(DEFAULT_LR, momentum=DEFAULT_MOMENTUM)
        return super().compile(optimizer=optimizer, **kwargs)

    def _prepare(self, x, y, batch_size, shuffle):
        if self._step_views is not None:
            return batches.prepare(x, y, batch_size, shuffle, views=None, keep_images=True)
        return batches.prepare(x, y, batch_size, shuffle, views=self._default_views)

    def _views_of(self, data):
        """Dict batch with the raw "image" replaced by its views (views_in="step")."""
        if self._step_views is None or not isinstance(data, dict) or "image" not in data:
            return data
        rest = {k: v for k, v in data.items() if k != "image"}
        return {**rest, **self._step_views(data["image"])}

    def train_step(self, data):
        return super().train_step(self._views_of(data))

    def _before_fit(self, prepared):
        """Size the memories, check them against the batch and the teachers' features."""

    def fit(self, x=None, y=None, batch_size=None, epochs=1, shuffle=True, **kwargs):
        """Trains on `x` (see `kd_keras.api.batches.ACCEPTED`); other arguments as Keras'."""
        prepared = self._prepare(x, y, batch_size, shuffle)
        self._fit_epochs = int(epochs)
        with _Translated(self._argument_names):
            self._before_fit(prepared)
        if not self.built:
            # As the command line does: memories and heads exist before Keras traces a step.
            self.build((None, self._image_size, self._image_size, 3))
        if not self._checked_teachers and self._api_teachers:
            self._checked_teachers = True
            first = self._views_of(next(iter(prepared.dataset.take(1))))
            if "teacher_features" not in first and "student" in first:
                for teacher in self._api_teachers:
                    warn_if_degenerate(teacher, first.get("teacher", first["student"]))
        validation = kwargs.pop("validation_data", None)
        if validation is not None:
            kwargs["validation_data"] = batches.prepare(
                validation, shuffle=False, views=None
            ).dataset
        return super().fit(prepared.dataset, epochs=epochs, shuffle=False, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        """The method's loss on `x` (any form `fit` accepts), images used as they are."""
        data = batches.prepare(x, y, batch_size, shuffle=False, views=None).dataset
        return super().evaluate(data, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        """The student's features [N, m] of images (any form `fit` accepts)."""
        return self.student.predict(batches.images_only(x, batch_size), **kwargs)

    def save(self, filepath, *args, **kwargs):
        raise NotImplementedError(
            f"A kd_keras.{type(self).__name__} is not saved whole (its teachers are external "
            "frozen networks and its banks training state): save the trained network with "
            "`distiller.student.save('student.keras')` (it loads with keras.models.load_model "
            "after `import kd_keras`), or the training state with `distiller.save_weights("
            "'state.weights.h5')` into a distiller built the same way."
        )


def _memory_size(name, given, paper, num_examples, batch_size, multiple_of_batch=False):
    """The bank size for `given` ("auto" or int), warning when the data cannot fill it."""
    if given == AUTO:
        size = paper
        if num_examples is not None:
            size = min(paper, max(batch_size, round(paper * num_examples / IMAGENET_SIZE)))
        if multiple_of_batch:
            size = max(batch_size, size - size % batch_size)
        return size
    if num_examples is not None and given > num_examples:
        warnings.warn(
            f"{name}={given} exceeds the {num_examples} training images: the bank never holds "
            f"that many distinct samples (its initial random rows stay for "
            f"{given / num_examples:.1f} epochs); leave {name}='auto' or use <= {num_examples}.",
            stacklevel=4,
        )
    return given


class SimReg(_Distiller, simreg.SimReg):
    """SimReg: regress the teachers' normalised features through a prediction head each.

    Args:
      student: keras.Model, images [B, S, S, 3] in [0, 1] -> features [B, m].
      teacher / teachers: one or several teachers: keras.Model(s) with pooled output
        [B, d], spec strings as on the command line, or a {name: model} dict.
      head: "mlp4" (the paper's), "mlp2", "linear", a keras.Model (one teacher), or a
        {teacher name: head} dict.
      head_hidden_dims: hidden sizes of the MLP heads (default: the paper's).
      variant: "simreg", "regress" or "regress_bn" (the paper's baselines; linear head).
      teacher_input: what plain teacher models expect: "unit", "imagenet",
        "minus_one_one" or a function of [0, 1] images.
      views: "auto" (SimReg's weak view, crop scale (0.4, 1), computed on the host), None
        (images used as given) or a `kd_keras.views(...)`.
      image_size: side of the views (default: the student's input side).
      weight_decay: coupled L2 (1e-4, PyTorch SGD semantics).
    """

    def __init__(
        self,
        student,
        teacher=None,
        teachers=None,
        head="mlp4",
        head_hidden_dims=None,
        variant="simreg",
        teacher_input="unit",
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        name="simreg",
        **kwargs,
    ):
        size = _input_side(student, image_size)
        loaded = resolve_teachers(teacher, teachers, teacher_input, size)
        if not loaded:
            raise ValueError("SimReg needs at least one teacher: give teacher= or teachers=.")
        dim = student.output_shape[-1]
        if isinstance(head, keras.Model) and len(loaded) > 1:
            raise ValueError(
                "head= is a single keras.Model but there are several teachers: give a head "
                "name, or a {teacher name: head} dict."
            )
        head_of = head if isinstance(head, dict) else {t.name: head for t in loaded}
        head_list = [
            _head_for(head_of.get(t.name), dim, t.feature_dim, f"head_{t.name}", head_hidden_dims)
            for t in loaded
        ]
        with _Translated({"method": "variant", "teacher": "teacher", "head": "head"}):
            super().__init__(
                student,
                loaded,
                head_list,
                variant=variant,
                sync_bn=SYNC_BN,
                weight_decay=weight_decay,
                name=name,
                **kwargs,
            )
        self._setup(_views(views, views_lib.Views("weak", size, scale=(0.4, 1.0))), size, loaded)


class _SingleTeacher(_Distiller):
    """Resolves one teacher; refuses several."""

    @staticmethod
    def _one(cls_name, teacher, teachers, teacher_input, size):
        loaded = resolve_teachers(teacher, teachers, teacher_input, size)
        if len(loaded) != 1:
            raise ValueError(
                f"{cls_name} distils exactly one teacher, got {len(loaded)}; kd_keras.SimReg "
                "takes several."
            )
        return loaded[0]


class CompRess(_SingleTeacher, compress.CompRess):
    """CompRess-1q / 2q: mimic the teacher's similarities to a bank of anchors.

    Args:
      student, teacher, teacher_input, views, image_size, weight_decay: as `SimReg`.
      mode: "2q" (teacher and student banks) or "1q" (one teacher bank).
      head: the student-side head to the teacher's dimension: default "linear" for 1q
        (CompRess' added linear layer) and None for 2q (backbone features); a name or Model.
      bank_size: anchors per bank; "auto" = CompRess' 128,000 scaled to the data size as
        128,000 is to ImageNet's (at least one batch), else 128,000.
      temperature: T (0.04). momentum: 2q key-encoder momentum (0.999; 0 = none).
      bank_rows: "unit" (bank rows l2-normalised when read) or "as_stored" (CompRess' own
        reading: its random initial rows keep their norms), see `methods.compress.CompRess`.
    """

    _argument_names = {
        "bank_size": "bank_size",
        "compress_temperature": "temperature",
        "compress_momentum": "momentum",
        "compress_bank_rows": "bank_rows",
        "batch_size": "batch_size",
        "head": "head",
    }

    def __init__(
        self,
        student,
        teacher=None,
        teachers=None,
        mode="2q",
        head=AUTO,
        bank_size=AUTO,
        temperature=compress.TEMPERATURE,
        momentum=compress.MOMENTUM,
        bank_rows="unit",
        teacher_input="unit",
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        seed=None,
        name=None,
        **kwargs,
    ):
        size = _input_side(student, image_size)
        loaded = self._one("CompRess", teacher, teachers, teacher_input, size)
        if head == AUTO:
            head = "linear" if mode == "1q" else None
        head = _head_for(head, student.output_shape[-1], loaded.feature_dim, "head")
        self._bank_auto = bank_size == AUTO
        with _Translated(self._argument_names):
            super().__init__(
                student,
                loaded,
                head,
                mode=mode,
                bank_size=compress.BANK_SIZE if self._bank_auto else bank_size,
                temperature=temperature,
                momentum=momentum if mode == "2q" else 0.0,
                seed=seed,
                bank_rows=bank_rows,
                weight_decay=weight_decay,
                name=name or f"compress_{mode}",
                **kwargs,
            )
        self._setup(_views(views, views_lib.Views("weak", size, scale=(0.08, 1.0))), size, [loaded])

    def _before_fit(self, prepared):
        banks = [b for b in (self.teacher_bank, self.student_bank) if b is not None]
        if not self.teacher_bank.built:
            given = AUTO if self._bank_auto else self.teacher_bank.size
            size = _memory_size(
                "bank_size",
                given,
                compress.BANK_SIZE,
                prepared.num_examples,
                prepared.batch_size,
            )
            for bank in banks:
                bank.size = size
        self.check_batch(prepared.batch_size)


class SEED(_SingleTeacher, seed.SEED):
    """SEED: mimic the teacher's similarities to a queue of teacher embeddings.

    Args:
      student, teacher, teacher_input, views, image_size, weight_decay: as `SimReg`.
      head: "mlp2" (SEED's --student_mlp), "linear", "mlp4" or a keras.Model, to the
        teacher's dimension.
      queue_size: "auto" = SEED's 65,536 scaled to the data size as to ImageNet's, rounded
        down to a multiple of the batch (at least one batch), else 65,536; an int must be a
        multiple of the batch size.
      student_temperature: tau_S (0.2). teacher_temperature: tau_T (1e-4).
    """

    _argument_names = {
        "queue_size": "queue_size",
        "seed_student_temperature": "student_temperature",
        "seed_teacher_temperature": "teacher_temperature",
        "batch_size": "batch_size",
        "head": "head",
    }

    def __init__(
        self,
        student,
        teacher=None,
        teachers=None,
        head="mlp2",
        queue_size=AUTO,
        student_temperature=seed.STUDENT_TEMPERATURE,
        teacher_temperature=seed.TEACHER_TEMPERATURE,
        teacher_input="unit",
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        seed=None,
        name="seed",
        **kwargs,
    ):
        size = _input_side(student, image_size)
        loaded = self._one("SEED", teacher, teachers, teacher_input, size)
        head = _head_for(head, student.output_shape[-1], loaded.feature_dim, "head")
        self._queue_auto = queue_size == AUTO
        with _Translated(self._argument_names):
            super().__init__(
                student,
                loaded,
                head,
                queue_size=_seed_queue() if self._queue_auto else queue_size,
                student_temperature=student_temperature,
                teacher_temperature=teacher_temperature,
                seed=seed,
                weight_decay=weight_decay,
                name=name,
                **kwargs,
            )
        self._setup(_views(views, views_lib.Views("weak", size, scale=(0.2, 1.0))), size, [loaded])

    def _before_fit(self, prepared):
        if not self.queue.built:
            given = AUTO if self._queue_auto else self.queue.size
            self.queue.size = _memory_size(
                "queue_size",
                given,
                _seed_queue(),
                prepared.num_examples,
                prepared.batch_size,
                multiple_of_batch=True,
            )
        self.check_batch(prepared.batch_size)


def _seed_queue():
    from kd_keras.methods import seed as seed_module

    return seed_module.QUEUE_SIZE


class CRD(_SingleTeacher, crd.CRD):
    """CRD (contrastive loss only): NCE against memories of every training sample.

    Args:
      student, teacher, teacher_input, views, image_size, weight_decay: as `SimReg`.
      num_data: number of training images N (memories hold one row each); "auto" = read
        from the data at the first `fit`, which must then be arrays (numbered here) or
        dict batches with "index".
      head: "linear" (CRD's embed_s) or "mlp2" / "mlp4" / a keras.Model, to feature_dim.
      feature_dim: 128. num_negatives: 16,384 ("auto": min(16,384, N - 1)).
      temperature: 0.07. momentum: memory momentum 0.5.
    """

    _argument_names = {
        "crd_feature_dim": "feature_dim",
        "crd_num_negatives": "num_negatives",
        "crd_temperature": "temperature",
        "crd_momentum": "momentum",
        "head": "head",
    }

    def __init__(
        self,
        student,
        teacher=None,
        teachers=None,
        num_data=AUTO,
        head="linear",
        feature_dim=crd.FEATURE_DIM,
        num_negatives=AUTO,
        temperature=crd.TEMPERATURE,
        momentum=crd.MEMORY_MOMENTUM,
        teacher_input="unit",
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        seed=0,
        name="crd",
        **kwargs,
    ):
        size = _input_side(student, image_size)
        loaded = self._one("CRD", teacher, teachers, teacher_input, size)
        head = _head_for(head, student.output_shape[-1], feature_dim, "head")
        self._sizes_auto = (num_data == AUTO, num_negatives == AUTO)
        # "auto" sizes are set at the first fit, when the data size is known; until then
        # the memories (not built yet) carry placeholder sizes.
        with _Translated(self._argument_names):
            super().__init__(
                student,
                loaded,
                head,
                num_data=1 if num_data == AUTO else num_data,
                feature_dim=feature_dim,
                num_negatives=crd.NUM_NEGATIVES if num_negatives == AUTO else num_negatives,
                temperature=temperature,
                momentum=momentum,
                seed=seed,
                weight_decay=weight_decay,
                name=name,
                **kwargs,
            )
        self._setup(_views(views, views_lib.Views("weak", size, scale=(0.08, 1.0))), size, [loaded])

    def _before_fit(self, prepared):
        if "index" not in prepared.dataset.element_spec:
            raise ValueError(
                "CRD keeps one memory row per training image, so each batch needs the "
                "images' indices: pass arrays (kd_keras numbers them) or dict batches with "
                f"an 'index' entry. {batches.ACCEPTED}."
            )
        if self.student_memory.built:
            return
        data_auto, negatives_auto = self._sizes_auto
        if data_auto:
            if prepared.num_examples is None:
                raise ValueError("CRD(num_data='auto') needs data of known size: give num_data=.")
            self.num_data = prepared.num_examples
            self.student_memory.size = self.teacher_memory.size = self.num_data
        if negatives_auto:
            self.num_negatives = min(crd.NUM_NEGATIVES, max(1, self.num_data - 1))


class Supervised(_Distiller, supervised.Supervised):
    """Supervised training of `student` with a linear classifier (teachers, baselines).

    Args:
      student: keras.Model images -> features. num_classes: classes of the labels.
      views: "auto" (the weak view, scale (0.2, 1)), None or a `kd_keras.views(...)`.
    Data: (images, labels) or arrays with y=.
    """

    def __init__(
        self,
        student,
        num_classes,
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        name="supervised",
        **kwargs,
    ):
        size = _input_side(student, image_size)
        super().__init__(student, num_classes, weight_decay=weight_decay, name=name, **kwargs)
        self._setup(_views(views, views_lib.Views("weak", size)), size)

    @property
    def student(self):
        return self.backbone

    def _before_fit(self, prepared):
        if "label" not in prepared.dataset.element_spec:
            raise ValueError(f"Supervised needs labels. {batches.ACCEPTED}.")


def _clustering_parts(student, proj_dim, num_prototypes, hidden_dim, dropout, name):
    head = heads.ProjectionHead(hidden_dim, proj_dim, dropout, "output", sync_bn=SYNC_BN, name=name)
    prototypes = clustering.Prototypes(num_prototypes, proj_dim, name="prototypes")
    return head, prototypes


class SwAV(_Distiller, swav.SwAV):
    """SwAV: swapped prediction of cluster codes over multi-crop views (no teacher).

    Args:
      student: keras.Model taking images of any side -> features (image_size= then gives
        the large crop side).
      num_prototypes: K, the prototypes (SwAV: 3000).
      proj_dim: the projection's output size (128).
      proj_hidden_dim: the projection's hidden size (2048).
      temperature: of the swapped prediction's softmax (0.1).
      epsilon: Sinkhorn's entropy weight (0.05).
      sinkhorn_iters: Sinkhorn iterations (3).
      views: "auto" (2 crops at image_size + 6 at 96/224 of it), None or `kd_keras.views`.
    """

    def __init__(
        self,
        student,
        num_prototypes=3000,
        proj_dim=128,
        proj_hidden_dim=2048,
        temperature=0.1,
        epsilon=0.05,
        sinkhorn_iters=3,
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        name="swav",
        **kwargs,
    ):
        size = _input_side(student, image_size)
        head, prototypes = _clustering_parts(
            student, proj_dim, num_prototypes, proj_hidden_dim, (0.0, 0.0), "projection_head"
        )
        super().__init__(
            student,
            head,
            prototypes,
            None,
            temperature=temperature,
            epsilon=epsilon,
            sinkhorn_iters=sinkhorn_iters,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self._setup(_views(views, views_lib.Views("multicrop", size)), size)


class OSS(_Distiller, oss.OSS):
    """OSS: online distillation of a SwAV teacher trained together with the student.

    Args:
      student: keras.Model taking images of any side. teacher: a keras.Model taking images
        of any side, trained jointly (online OSS).
      num_prototypes, proj_dim, proj_hidden_dim, temperature, epsilon, sinkhorn_iters: as
        `SwAV`. dropout: the heads' dropout rates (0.1, 0.05). feature_classifier: the domain
        classifier with gradient reversal (True). total_steps: steps of its schedule ("auto":
        the first fit's epochs x batches per epoch, when the data size is known). grl_scale:
        factor on the reversal's alpha(n) (1.0, the paper's, as `--grl_scale`).
    """

    def __init__(
        self,
        student,
        teacher,
        num_prototypes=3000,
        proj_dim=128,
        proj_hidden_dim=2048,
        dropout=(0.1, 0.05),
        feature_classifier=True,
        total_steps=AUTO,
        grl_scale=1.0,
        temperature=0.1,
        epsilon=0.05,
        sinkhorn_iters=3,
        views=AUTO,
        image_size=None,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        name="oss",
        **kwargs,
    ):
        size = _input_side(student, image_size)
        if not isinstance(teacher, keras.Model):
            raise TypeError("OSS trains its teacher online: give teacher= a keras.Model.")
        t_head, prototypes = _clustering_parts(
            teacher, proj_dim, num_prototypes, proj_hidden_dim, dropout, "teacher_head"
        )
        s_head = heads.ProjectionHead(
            proj_hidden_dim, proj_dim, dropout, "output", sync_bn=SYNC_BN, name="student_head"
        )
        if not grl_scale >= 0:
            raise ValueError(f"grl_scale must be >= 0, got {grl_scale}.")
        if grl_scale != 1.0 and not feature_classifier:
            raise ValueError("grl_scale scales the feature classifier's reversed gradient; "
                             "feature_classifier=False has none.")
        classifier = grl = None
        if feature_classifier:
            classifier = heads.feature_classifier(proj_dim, 100, sync_bn=SYNC_BN)
            grl = heads.GradientReversal(name="gradient_reversal")
        super().__init__(
            teacher,
            t_head,
            student,
            s_head,
            prototypes,
            None,
            classifier,
            grl,
            total_steps=1 if total_steps == AUTO else total_steps,
            grl_scale=grl_scale,
            online=True,
            temperature=temperature,
            epsilon=epsilon,
            sinkhorn_iters=sinkhorn_iters,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self._setup(_views(views, views_lib.Views("multicrop", size)), size)
        self._total_steps_auto = total_steps == AUTO

    def _before_fit(self, prepared):
        # Read by the traced step, so only the first fit (before tracing) sets it.
        if self._total_steps_auto and prepared.num_examples is not None:
            self._total_steps_auto = False
            self.total_steps = self._fit_epochs * (prepared.num_examples // prepared.batch_size)
