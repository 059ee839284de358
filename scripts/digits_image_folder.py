"""Writes scikit-learn's digits as an image folder root/{train,test}/<digit>/<row>.png.

The split is kd_keras' own digits split (`kd_keras.data.sources.digits_rows`: stratified 80/20, seed
0), so `--transfer_data=<root>` reads the same 1437 / 360 images as `--dataset=digits`, through
the image-folder path (PNG files, 8x8 greyscale, 0..255). An offline transfer target for
`python -m kd_keras.evaluate --protocols=transfer` (docs/transfer.md).

  python scripts/digits_image_folder.py /tmp/digits_folder
"""

import os
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from kd_keras.data import sources as data


def write_digits_folder(root):
    """Writes the folder; returns {split: number of images}."""
    digits = load_digits()
    counts = {}
    for split in ("train", "test"):
        rows = data.digits_rows(split)
        for row in rows:
            folder = os.path.join(root, split, str(digits.target[row]))
            os.makedirs(folder, exist_ok=True)
            # Pixel values are counts of set bits in 4x4 blocks (0..16).
            pixels = np.clip(digits.images[row] * 16, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{row:04d}.png"))
        counts[split] = len(rows)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTPUT_ROOT")
    print(write_digits_folder(sys.argv[1]))
