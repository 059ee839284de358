"""Reads the tensors of a foreign checkpoint file into NumPy, whatever framework wrote it.

Formats (`read_checkpoint` detects them from the file itself, not the suffix):

  torch_zip, torch_legacy   `torch.save` files (.pth, .pth.tar), via `kd_keras.torch_pickle`
                            (no torch, no code from the file is run)
  safetensors               .safetensors files, via the safetensors package's NumPy API
  tf                        TF checkpoints (a prefix with .index/.data files, or a directory
                            with a `checkpoint` file), via tf.train.load_checkpoint

A checkpoint is returned as named *containers*: flat {key: array} state dicts. A torch file
holding a bare state dict has one container ""; a training checkpoint such as MoCo's
{"epoch", "arch", "state_dict", "optimizer"} has the container "state_dict" and the other
entries are listed in `SourceCheckpoint.other` (never converted, recorded as skipped).
"""

import dataclasses
import glob
import hashlib
import os
import zipfile

import numpy as np

from kd_keras.teachers import torch_pickle

FORMATS = ("torch_zip", "torch_legacy", "safetensors", "tf")
# What a container's values are: arrays, or torch tensors read on demand (np.asarray reads).
_TENSORS = (np.ndarray, torch_pickle.LazyTensor)
_SAFETENSORS_SUFFIX = ".safetensors"


@dataclasses.dataclass
class SourceCheckpoint:
    """Tensors of one checkpoint.

    Attributes:
      path: the file (or TF checkpoint prefix) read.
      format: one of FORMATS.
      sha256: hex digest of the file's bytes (TF: of its .index and .data files in name order).
      containers: {container name: {key: np.ndarray or torch_pickle.LazyTensor}}; "" is the
        top level. Both have .shape; np.asarray gives the array (reading a LazyTensor's bytes).
      other: {top-level entry: short description} of what is not a tensor container.
    """

    path: str
    format: str
    sha256: str
    containers: dict
    other: dict


_SHA256_MEMO = {}


def file_sha256(paths):
    """sha256 hex digest of the concatenated bytes of `paths` (read in 8 MiB chunks).

    Remembered per process by (path, size, mtime), so that the teacher loader, oss_offline's
    network loader and the converter do not each re-read a several-hundred-MB checkpoint.
    """
    key = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in map(str, paths))
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        for path, _, _ in key:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 23), b""):
                    digest.update(chunk)
        _SHA256_MEMO[key] = digest.hexdigest()
    return _SHA256_MEMO[key]


def tf_checkpoint_prefix(path):
    """The TF checkpoint prefix named by `path` (a prefix or a directory), or None."""
    if os.path.isdir(path):
        import tensorflow as tf

        return tf.train.latest_checkpoint(path)
    if os.path.isfile(f"{path}.index"):
        return path
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    return None


def _is_plain_file(path):
    return os.path.isfile(path) and not path.endswith(".index")


def source_files(path):
    """The files whose bytes identify the checkpoint at `path` (for sha256 and caching)."""
    prefix = None if _is_plain_file(path) else tf_checkpoint_prefix(path)
    if prefix is None:
        return [path]
    return sorted([f"{prefix}.index", *glob.glob(f"{glob.escape(prefix)}.data-*")])


def checkpoint_exists(path):
    return os.path.isfile(path) or tf_checkpoint_prefix(path) is not None


def read_checkpoint(path):
    """Reads `path` into a `SourceCheckpoint`.

    Raises:
      FileNotFoundError: nothing there.
      torch_pickle.UnsafeCheckpointError: a torch pickle references a forbidden global.
      ValueError: the file is in none of FORMATS or is corrupt.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path) and tf_checkpoint_prefix(path) is None:
        raise ValueError(f"{path} is a directory without a TF checkpoint (no 'checkpoint' file).")
    if not checkpoint_exists(path):
        raise FileNotFoundError(f"{path} does not exist (nor is it a TF checkpoint prefix).")
    files = source_files(path)
    sha = file_sha256(files)
    if not _is_plain_file(path):
        prefix = tf_checkpoint_prefix(path)
        return SourceCheckpoint(prefix, "tf", sha, {"": _read_tf(prefix)}, {})
    if path.endswith(_SAFETENSORS_SUFFIX):
        return SourceCheckpoint(path, "safetensors", sha, {"": _read_safetensors(path)}, {})
    fmt = "torch_zip" if zipfile.is_zipfile(path) else "torch_legacy"
    try:
        obj = torch_pickle.load(path, lazy=True)
        torch_pickle.count_tensors(obj)  # refuses too deep nesting before anything walks it
    except torch_pickle.UnsafeCheckpointError:
        raise
    except (torch_pickle.CheckpointFormatError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint, .safetensors file or TF checkpoint "
            f"({_reason(err)})."
        ) from err
    except Exception as err:  # a corrupt pickle can raise nearly anything (UnpicklingError, ...)
        raise ValueError(
            f"{path}: cannot read it as a PyTorch checkpoint ({_reason(err)})."
        ) from err
    containers, other = _split_containers(obj, path)
    return SourceCheckpoint(path, fmt, sha, containers, other)


def _reason(err):
    """The error's message, or its type when it has none (a MemoryError from a pickle claiming
    a 2^60-byte string)."""
    text = str(err).strip()
    if isinstance(err, MemoryError):
        return f"MemoryError: a length in the file is too large{': ' + text if text else ''}"
    return text or type(err).__name__


def _is_state_dict(value):
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, _TENSORS) for k, v in value.items())
    )


def _describe(value):
    if isinstance(value, dict):
        tensors = torch_pickle.count_tensors(value)
        return f"{type(value).__name__} with {len(value)} entries, {tensors} tensors"
    if isinstance(value, _TENSORS):
        return f"tensor {list(value.shape)}"
    return type(value).__name__


def _split_containers(obj, path):
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict."
        )
    if _is_state_dict(obj):
        return {"": dict(obj)}, {}
    containers, other = {}, {}
    for key, value in obj.items():
        if isinstance(key, str) and _is_state_dict(value):
            containers[key] = dict(value)
        else:
            other[str(key)] = _describe(value)
    if not containers:
        raise ValueError(
            f"{path} holds no state dict (entries: {sorted(other)[:10]}); expected a dict of "
            "tensors or a checkpoint with e.g. 'state_dict'."
        )
    return containers, other


def _read_safetensors(path):
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as err:  # the Rust reader raises its own SafetensorError
        raise ValueError(f"{path}: not a readable .safetensors file ({err}).") from err


def _read_tf(prefix):
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        names = reader.get_variable_to_shape_map()
        return {name: np.asarray(reader.get_tensor(name)) for name in sorted(names)}
    except (tf.errors.OpError, ValueError) as err:
        raise ValueError(f"{prefix}: not a readable TF checkpoint ({err}).") from err
