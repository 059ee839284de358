"""The directory a conversion writes: its file names, its manifest, the `--overwrite` guard and
the atomic write. Shared by the ResNet/RegNet conversion (`conversion`) and the ViT one
(`vit_conversion`), so both refuse to replace anything but a converted teacher.
"""

import json
import os
import shutil

# A SwAV conversion is also a clustering-networks directory, of that kind.
from kd_keras.artifacts.layout import NETWORK_KIND

CONVERTED_KIND = "kd_keras_converted_teacher"
MANIFEST = "manifest.json"
BACKBONE_FILE = "backbone.keras"


def read_manifest(directory):
    """The manifest of a converted directory, or None if `directory` is not one.

    Raises:
      ValueError: naming the manifest when it is not valid JSON.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            manifest = json.load(f)
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(manifest, dict):
        return None
    return manifest if "source" in manifest and "mapping" in manifest else None


def is_converted_dir(directory):
    """Whether `directory` holds a converted teacher (its manifest says so)."""
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError):
        return False
    return manifest is not None and manifest.get("kind") in (CONVERTED_KIND, NETWORK_KIND)


def check_out(out, overwrite):
    """Refuses an existing `out` unless --overwrite, and then anything but a converted teacher
    (or an empty directory): --overwrite deletes it, so only ever one this command wrote.

    Raises:
      ValueError: naming --out.
    """
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ValueError(f"--out={out} exists; remove it or pass --overwrite.")
    if os.path.islink(out) or not os.path.isdir(out):
        raise ValueError(
            f"--out={out} is not a directory; --overwrite replaces only a converted teacher."
        )
    if os.listdir(out) and not is_converted_dir(out):
        raise ValueError(
            f"--out={out} is not a kd_keras converted teacher (no {MANIFEST} of kind "
            f"{CONVERTED_KIND}); --overwrite refuses to delete it."
        )


def write(out, save_files, manifest, overwrite):
    """Writes the directory `out` atomically: `save_files(tmp)` saves the networks into a
    temporary sibling, the manifest goes last, and the result replaces `out` (checked again
    just before a --overwrite deletes it). Nothing is left behind on failure."""
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_files(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if overwrite and os.path.isdir(out):
            check_out(out, overwrite)  # still one we wrote, just before deleting it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
