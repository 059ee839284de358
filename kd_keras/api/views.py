"""`kd_keras.views`: the papers' augmented views of a batch of images, for a tf.data map.

The distillers apply these on the host, in their `tf.data` pipeline (`Dataset.map` after
batching, parallel to the training step), as the command line does; pass `views=None` to a
distiller to feed views you computed yourself, or dict batches.
"""

import tensorflow as tf

from kd_keras.data import augment

KINDS = ("weak", "strong", "none", "multicrop")
# SwAV's / OSS's multi-crop: 2 crops at the image size and 6 at 96/224 of it.
SMALL_CROP_RATIO = 96 / 224


class Views:
    """Callable `images [B, H, W, 3] (uint8 or float in [0, 1]) -> dict batch of views`.

    Args:
      kind: "weak" (SimReg's weak view: random resized crop + flip; also CompRess, SEED, CRD),
        "strong" (+ colour jitter, greyscale, blur), "none" (centre crop) -> {"student":
        [B, S, S, 3]}; "multicrop" (SwAV / OSS) -> {"large": [B, n_large, S, S, 3], "small":
        [B, n_small, s, s, 3]}.
      size: output side S in pixels.
      scale: area-fraction range of the random crops (weak/strong; default (0.2, 1.0)).
      small_size: multicrop small side (default round(S * 96 / 224)).
      counts: multicrop (n_large, n_small), default (2, 6).
      resize: "auto" (the command line's default: the fast resize where it gives the same
        views) or "antialias".
      seed: optional int; the views of a run are then reproducible.
      strong_blur: "strong"'s Gaussian blur, as `--strong_blur`: "paper" (SimReg B.2: sigma in
        [0, 1], every view) or "official" (the authors' code: sigma in [0.1, 2], p = 0.5).

    Every image gets a fresh seed pair per call, drawn with `tf.random` (deterministic after
    `keras.utils.set_random_seed` when `seed` is given).
    """

    def __init__(
        self,
        kind="weak",
        size=224,
        scale=(0.2, 1.0),
        small_size=None,
        counts=(2, 6),
        resize="auto",
        seed=None,
        strong_blur="paper",
    ):
        if kind not in KINDS:
            raise ValueError(f"views kind={kind!r}: use one of {KINDS}.")
        if strong_blur != "paper" and kind != "strong":
            raise ValueError(
                f"views strong_blur={strong_blur!r} is the blur of kind='strong'; this is "
                f"kind={kind!r}."
            )
        self.kind = kind
        self.size = int(size)
        self.seed = seed
        if kind == "multicrop":
            small = int(small_size or max(1, round(self.size * SMALL_CROP_RATIO)))
            self.fn = augment.make_multicrop_fn(
                sizes=(self.size, small), counts=tuple(counts), resize=resize
            )
        else:
            self.fn = augment.make_view_fn(
                kind,
                self.size,
                "same",
                scale,
                keys=("student",),
                resize=resize,
                strong_blur=strong_blur,
            )
        self._signature = None

    def _output_signature(self):
        if self._signature is None:
            probe = self.fn(tf.zeros([self.size, self.size, 3]), tf.constant([0, 0], tf.int64))
            self._signature = {k: tf.TensorSpec(v.shape, tf.float32) for k, v in probe.items()}
        return self._signature

    def per_image(self, image):
        """The views of one image [H, W, 3] with a fresh seed pair: {key: view}; for a
        `Dataset.map` before batching (the distillers' own path, as the command line's)."""
        seed = tf.random.uniform([2], maxval=2**62, dtype=tf.int64, seed=self.seed)
        return self.fn(tf.convert_to_tensor(image), seed)

    def __call__(self, images):
        images = tf.convert_to_tensor(images)
        batch = tf.shape(images)[0]
        seeds = tf.random.uniform([batch, 2], maxval=2**62, dtype=tf.int64, seed=self.seed)
        return tf.map_fn(
            lambda args: self.fn(args[0], args[1]),
            (images, seeds),
            fn_output_signature=self._output_signature(),
        )


def views(kind="weak", size=224, **options):
    """A `Views` (see there): `dataset.map(kd_keras.views("weak", 32))` gives dict batches
    {"student": [B, 32, 32, 3]} that every distiller's `fit` accepts as they are."""
    return Views(kind, size, **options)
