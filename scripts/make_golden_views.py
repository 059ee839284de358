"""Writes the golden training views that tests/test_golden_views.py replays.

The views were first written with the code of commit e707edf (the per-image pipeline before the
fast input pipeline of issue 10), so the test proves that the refactor kept every view bit for
bit. Rerun only on purpose (it overwrites the fixtures):

  PYTHONPATH=$PWD python scripts/make_golden_views.py

Writes under tests/data/golden_views/:
  folder/train/<class>/*      four tiny images (baseline JPEG RGB, greyscale JPEG, RGBA PNG,
                              progressive-free JPEG of odd size), the folder dataset below;
  views.npz                   per-image views (weak same/different, strong same/different,
                              multi-crop 2 x 20 + 3 x 12, centre crop) for two
                              (seed, index, epoch) triples per image, keyed "<kind>/<image>/<s>_<i>_<e>";
  pipeline.npz                two epochs of make_train_dataset batches over the folder (weak
                              "same" and "different", strong "same", multi-crop), keyed
                              "<pipe>/<step>/<key>".
"""

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import tensorflow as tf  # noqa: E402

from kd_keras.data import augment  # noqa: E402
from kd_keras.data import sources as data  # noqa: E402

OUT = os.path.join(REPO, "tests", "data", "golden_views")
VIEW_SIZE = 16
MULTICROP = {"sizes": (20, 12), "counts": (2, 3)}
TRIPLES = ((0, 0, 0), (0, 3, 1), (7, 1, 0), (1234, 5, 9))
# The fixtures hold the bits of the antialiased kernel for every crop; tests set
# KD_GOLDEN_VIEW_RESIZE=auto to compare the library's default mode against them.
RESIZE_ENV = "KD_GOLDEN_VIEW_RESIZE"


def _resize():
    return os.environ.get(RESIZE_ENV, "antialias")


def _picture(height, width, seed):
    """Smooth colour gradients plus mild noise: a JPEG-friendly, seed-fixed uint8 image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / (5 + 3 * c) + c) * np.cos(y / (7 + 2 * c) - c) for c in range(3)
    ]
    image = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images():
    """The folder dataset: two classes, four files of four kinds."""
    from PIL import Image

    files = {
        ("a", "rgb.jpg"): (_picture(60, 80, 1), "JPEG"),
        ("a", "rgba.png"): (_picture(50, 70, 2), "PNG"),
        ("b", "grey.jpg"): (_picture(40, 40, 3)[..., 0], "JPEG"),
        ("b", "tall.jpg"): (_picture(91, 45, 4), "JPEG"),
    }
    for (cls, name), (array, fmt) in files.items():
        folder = os.path.join(OUT, "folder", "train", cls)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if os.path.exists(path):
            continue  # the images are the fixture too: never re-encode them
        if fmt == "PNG":
            alpha = np.full(array.shape[:2] + (1,), 200, np.uint8)
            Image.fromarray(np.concatenate([array, alpha], -1)).save(path, format="PNG")
        else:
            Image.fromarray(array).save(path, format="JPEG", quality=90)


def view_fns():
    """name -> fn(image, seed) of the view kinds the library builds."""
    fns = {
        f"{kind}_{mode}": augment.make_view_fn(kind, VIEW_SIZE, mode, resize=_resize())
        for kind in ("weak", "strong")
        for mode in ("same", "different")
    }
    fns["none"] = augment.make_view_fn("none", VIEW_SIZE, "same", resize=_resize())
    fns["multicrop"] = augment.make_multicrop_fn(**MULTICROP, resize=_resize())
    return fns


def image_paths():
    root = os.path.join(OUT, "folder", "train")
    return sorted(
        os.path.join(root, c, f)
        for c in sorted(os.listdir(root))
        for f in os.listdir(f"{root}/{c}")
    )


def per_image_views():
    """{key: float32 array} of every view fn on every image for every triple."""
    out = {}
    for number, path in enumerate(image_paths()):
        raw = tf.io.read_file(path)
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        name = os.path.basename(path)
        for fn_name, fn in view_fns().items():
            # Two triples per image keep the fixture small (float32 noise barely compresses).
            for s, i, e in (TRIPLES[number % 4], TRIPLES[(number + 1) % 4]):
                views = fn(image, data.view_seed(s, i, e))
                for key, value in views.items():
                    if fn_name.endswith("_same") and key == "teacher":
                        continue  # the same tensor as "student"
                    out[f"{fn_name}/{name}/{s}_{i}_{e}/{key}"] = value.numpy()
    return out


def pipelines():
    """name -> dataset of two epochs over the golden folder."""
    examples, _ = data.load_split(f"folder:{os.path.join(OUT, 'folder')}", "train")
    return {
        "weak_different": data.make_train_dataset(
            examples,
            augment.make_view_fn("weak", VIEW_SIZE, "different", resize=_resize()),
            2,
            seed=3,
            num_epochs=2,
            deterministic=True,
        ),
        # Single-crop views: the fast pipeline decodes only the crop window of a JPEG.
        "weak_same": data.make_train_dataset(
            examples,
            augment.make_view_fn("weak", VIEW_SIZE, "same", resize=_resize()),
            2,
            seed=11,
            num_epochs=2,
            deterministic=True,
        ),
        "strong_same": data.make_train_dataset(
            examples,
            augment.make_view_fn("strong", VIEW_SIZE, "same", resize=_resize()),
            2,
            seed=13,
            num_epochs=2,
            deterministic=True,
        ),
        "multicrop": data.make_train_dataset(
            examples,
            augment.make_multicrop_fn(**MULTICROP, resize=_resize()),
            2,
            seed=5,
            num_epochs=2,
            deterministic=True,
            view_epochs=3,
        ),
    }


def pipeline_batches():
    out = {}
    for name, ds in pipelines().items():
        for step, batch in enumerate(ds.as_numpy_iterator()):
            for key, value in batch.items():
                out[f"{name}/{step}/{key}"] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    write_images()
    np.savez_compressed(os.path.join(OUT, "views.npz"), **per_image_views())
    np.savez_compressed(os.path.join(OUT, "pipeline.npz"), **pipeline_batches())
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
