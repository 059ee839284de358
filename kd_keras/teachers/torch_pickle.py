"""Reads PyTorch checkpoints (`torch.save` files) into NumPy without torch and without running
code from the file.

Both of torch's formats are read:

  zip (torch >= 1.6)   a zip archive `<name>/data.pkl` + one raw file `<name>/data/<key>` per
                       storage (little-endian, the storage's dtype).
  legacy (< 1.6)       five concatenated pickles: magic number, protocol version, system info,
                       the object (storages as persistent ids), the sorted storage keys; then
                       each storage as an int64 element count followed by its raw bytes.

The object pickle is loaded by `RestrictedUnpickler`, whose `find_class` resolves only the
globals a checkpoint legitimately needs (tensor/parameter rebuild functions, storage types,
OrderedDict, argparse.Namespace, NumPy scalars) to local, side-effect-free stand-ins; any
other global (e.g. `os.system` smuggled in through `__reduce__`) raises `UnsafeCheckpointError`
naming it, before anything is called; the allowed globals cannot be modified by the pickle.
Tensors come back as NumPy arrays (C-contiguous copies), or with `lazy=True` as
`LazyTensor`s whose bytes are read only when converted to an array.

Hostile files (a checkpoint is often downloaded): every tensor's offset, sizes and strides are
checked against its storage's declared element count when the tensor is rebuilt, before any
view exists; a storage is read only as far as its tensors reach (a zip member is inflated no
further), and a zip member larger than its declared storage is refused (a deflate bomb).
Tensors over MAX_TENSOR_ELEMENTS, object pickles over MAX_PICKLE_BYTES and containers nested
deeper than MAX_NESTING are refused; shared and self-containing containers are walked once.
"""

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Limits against hostile files (a checkpoint is often downloaded from the internet). A vision
# checkpoint's largest tensors (a MoCo queue, a wide fc) hold a few 10^7 elements and its object
# pickle a few MB; these bounds are far above that and far below what would exhaust memory.
MAX_TENSOR_ELEMENTS = 1 << 28  # 1 GiB as float32
MAX_PICKLE_BYTES = 256 << 20
MAX_NESTING = 64  # containers inside containers

# torch storage class name -> NumPy dtype. bfloat16 has no NumPy dtype: read as uint16 and
# widened to float32 (exact) in `_bfloat16_to_float32`.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references a global outside the allow-list."""


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands."""


class _StorageType:
    """Stand-in for torch.<X>Storage: only carries the dtype (immutable: these instances are
    shared by every load, and a pickle's BUILD opcode must not be able to alter them)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _STORAGE_DTYPES[name])

    def __setattr__(self, key, value):
        raise UnsafeCheckpointError("a checkpoint tried to modify a storage type")


class _Storage:
    """A storage: its element type, its declared element count and a function reading its
    first elements as a flat array.

    The bytes are read only when a tensor on it is materialised, and only as many as that
    tensor reaches, so tensors a conversion skips (a key encoder, optimizer state) never occupy
    memory and a storage member that inflates past its declared size is never inflated.
    """

    def __init__(self, storage_type, numel, read=None):
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"storage of unknown type {storage_type!r}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointFormatError(f"storage with element count {str(numel)[:40]}")
        self.storage_type = storage_type
        self.numel = numel
        self.read = read  # set later for legacy files, whose bytes follow the object pickle

    def elements(self, count):
        """The first `count` (<= numel) elements, as a flat array."""
        if self.read is None:
            raise CheckpointFormatError("a storage has no data")
        return self.read(count)


class _TensorType:
    """Stand-in for torch.Tensor / torch.nn.Parameter in `_rebuild_from_type_v2` (each load
    gets a subclass of its own, which a BUILD opcode may alter harmlessly)."""


_TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}


def _bfloat16_to_float32(raw):
    return (raw.astype(np.uint32) << 16).view(np.float32)


class LazyTensor:
    """A tensor of a checkpoint whose data is read on demand.

    `shape`, `ndim` and `dtype` are known without reading; `np.asarray(t)` reads the storage
    and returns a C-contiguous copy of the tensor (every call reads again: nothing is cached).
    """

    def __init__(self, storage, storage_offset, size, stride):
        if not isinstance(storage, _Storage):
            raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}")
        self.storage = storage
        self.offset = _index(storage_offset, "storage offset")
        self.shape = _index_tuple(size, "size")
        self.stride = _index_tuple(stride, "stride")
        if len(self.stride) != len(self.shape):
            raise CheckpointFormatError(f"tensor with size {list(size)} and stride {list(stride)}")
        # Everything is checked here, before any array or view exists: a negative offset or a
        # view past the storage's end would read foreign memory in as_strided.
        self.extent = _extent(self.offset, self.shape, self.stride)
        if self.extent > storage.numel:
            raise CheckpointFormatError(
                f"tensor of size {list(self.shape)}, stride {list(self.stride)} at offset "
                f"{self.offset} runs past its storage ({storage.numel} elements)"
            )
        if _numel(self.shape) > MAX_TENSOR_ELEMENTS:
            raise CheckpointFormatError(
                f"tensor of size {list(self.shape)} has more than {MAX_TENSOR_ELEMENTS} elements"
            )
        kind = storage.storage_type.dtype
        self.dtype = np.dtype(np.float32 if kind == "bfloat16" else kind)

    @property
    def ndim(self):
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        flat = self.storage.elements(self.extent)
        array = _strided_copy(flat, self.offset, self.shape, self.stride)
        return array if dtype is None else array.astype(dtype, copy=False)


def _index(value, what):
    """A non-negative Python int from the pickle, else CheckpointFormatError naming `what`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointFormatError(f"tensor with {what} {str(value)[:40]}")
    return value


def _index_tuple(values, what):
    if not isinstance(values, (tuple, list)) or len(values) > MAX_NESTING:
        raise CheckpointFormatError(f"tensor with {what} {str(values)[:80]}")
    return tuple(_index(v, what) for v in values)


def _numel(shape):
    count = 1
    for n in shape:
        count *= n
    return count


def _extent(offset, shape, stride):
    """Storage elements a strided view reaches: its last index + 1 (0 for an empty view)."""
    if 0 in shape:
        return 0
    return offset + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) + 1


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): a `LazyTensor` (materialised by `load`)."""
    return LazyTensor(storage, storage_offset, size, stride)


def _strided_copy(flat, offset, shape, stride):
    """A C-contiguous copy of the strided view (offset, shape, stride) of the flat array."""
    if 0 in shape:
        return np.zeros(shape, flat.dtype)
    # Checked by LazyTensor already; as_strided itself checks nothing.
    if offset < 0 or min(stride, default=0) < 0 or _extent(offset, shape, stride) > flat.size:
        raise CheckpointFormatError(
            f"tensor of size {list(shape)} at offset {offset} runs past its storage "
            f"({flat.size} elements)"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=shape,
        strides=tuple(st * flat.itemsize for st in stride),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)  # ascontiguousarray would make 0-d arrays 1-d


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # `func` went through find_class too, so it is one of our rebuild functions.
    return func(*args)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError("numpy scalar of a non-numeric dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec)
    if dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy dtype {spec!r} holds Python objects")
    return dtype


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles of bytes made by Python 3 go through _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _reconstructor(cls, base, state):
    # copyreg._reconstructor, used by protocol 0/1 pickles of plain objects (a Namespace).
    if not (isinstance(cls, type) and issubclass(cls, argparse.Namespace)) or base is not object:
        raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r}")
    return cls()


class _Frozen:
    """A callable global handed to a pickle: calls `function`, but no attribute of it (nor of
    the function behind it: `__defaults__`, `__dict__`) can be set by a BUILD opcode, so a
    checkpoint cannot change how later loads in this process behave."""

    __slots__ = ("_function",)

    def __init__(self, function):
        object.__setattr__(self, "_function", function)

    def __call__(self, *args, **kwargs):
        return self._function(*args, **kwargs)

    def __setattr__(self, key, value):
        raise UnsafeCheckpointError("a checkpoint tried to modify an allowed global")

    def __reduce__(self):
        raise TypeError("not picklable")


_SAFE_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
# Built-in types refuse attribute setting themselves (TypeError: immutable type).
_SAFE_TYPES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    # Protocol 0-2 pickles written by Python 2 (or with fix_imports) name the module __builtin__.
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "object"): object,
    ("__builtin__", "slice"): slice,
}
_SAFE_GLOBALS = {key: _Frozen(f) for key, f in _SAFE_FUNCTIONS.items()}
_SAFE_GLOBALS.update(_SAFE_TYPES)
_SAFE_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only `_SAFE_GLOBALS` and loads storages from `load_storage`.

    Args:
      file: binary file positioned at the object pickle.
      load_storage: callable(persistent id tuple) -> `_Storage`.
    """

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        # A class of this load only: a BUILD opcode applied to the class object itself would
        # otherwise set attributes on argparse.Namespace for the whole process.
        self._namespace = type("Namespace", (argparse.Namespace,), {"__module__": "argparse"})
        self._tensor_type = type("Tensor", (_TensorType,), {})

    def find_class(self, module, name):
        if (module, name) == ("argparse", "Namespace"):
            return self._namespace
        if (module, name) in _TENSOR_TYPES:
            return self._tensor_type
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name}: not a tensor, container or number "
                "(kd_keras never runs code from a checkpoint)"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointFormatError(f"unknown persistent id {str(pid)[:80]}")
        return self._load_storage(pid)


def _storage_array(raw, storage_type):
    if storage_type.dtype == "bfloat16":
        return _bfloat16_to_float32(np.frombuffer(raw, dtype="<u2"))
    return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))


def _load_zip(path):
    # The archive stays open while tensors may still be materialised (closed when the last
    # LazyTensor referring to it is garbage collected).
    archive = zipfile.ZipFile(path)
    infos = {info.filename: info for info in archive.infolist()}
    pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError("zip file without exactly one <name>/data.pkl")
    root = pickles[0][: -len("data.pkl")]
    byteorder = root + "byteorder"
    if byteorder in infos and _read_member(archive, infos[byteorder], 16).strip() != b"little":
        raise CheckpointFormatError("big-endian checkpoints are not supported")
    storages = {}

    def load_storage(pid):
        # ("storage", storage_type, key, location, numel)
        if len(pid) != 5:
            raise CheckpointFormatError(f"unknown storage id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        info = infos.get(f"{root}data/{key}")
        if info is None:
            raise CheckpointFormatError(f"storage data/{key} missing")
        if key not in storages:
            storage = _Storage(storage_type, numel)
            itemsize = np.dtype(_raw_dtype(storage_type)).itemsize
            if info.file_size > numel * itemsize:
                # torch writes exactly numel * itemsize bytes: more is a forged member (a
                # deflate bomb inflating far past what the tensors declare).
                raise CheckpointFormatError(
                    f"storage data/{key} holds {info.file_size} bytes, more than its declared "
                    f"{numel} elements ({numel * itemsize} bytes)"
                )
            storage.read = _member_reader(archive, info, storage_type, itemsize)
            storages[key] = storage
        return storages[key]

    pickle_info = infos[pickles[0]]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(
            f"{pickles[0]} inflates to {pickle_info.file_size} bytes (limit {MAX_PICKLE_BYTES})"
        )
    raw = _read_member(archive, pickle_info, MAX_PICKLE_BYTES)
    return RestrictedUnpickler(io.BytesIO(raw), load_storage).load()


def _read_member(archive, info, limit):
    """At most `limit` bytes of a zip member, inflating no more than that."""
    with archive.open(info) as f:
        return f.read(limit)


def _member_reader(archive, info, storage_type, itemsize):
    def read(count):
        raw = _read_member(archive, info, count * itemsize)
        if len(raw) != count * itemsize:
            raise CheckpointFormatError(f"storage {info.filename} is truncated")
        return _storage_array(raw, storage_type)

    return read


def _load_legacy(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if _load_plain(f) != LEGACY_MAGIC:
            raise CheckpointFormatError("not a PyTorch checkpoint (wrong magic number)")
        if _load_plain(f) != LEGACY_PROTOCOL:
            raise CheckpointFormatError("unsupported legacy PyTorch protocol version")
        sys_info = _load_plain(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointFormatError("big-endian checkpoints are not supported")
        # The storages' bytes follow the object pickle: the object is loaded first, then each
        # storage's position in the file is recorded for reading on demand.
        storages = {}

        def load_storage(pid):
            # ("storage", storage_type, key, location, numel, view_metadata)
            if len(pid) != 6:
                raise CheckpointFormatError(f"unknown legacy storage id {str(pid)[:80]}")
            _, storage_type, key, _location, numel, view = pid
            if view is not None:
                raise CheckpointFormatError("storage views (pre-1.0 files) are not supported")
            if key not in storages:
                storages[key] = _Storage(storage_type, numel)
            return storages[key]

        obj = RestrictedUnpickler(f, load_storage).load()
        keys = _load_plain(f)
        if not isinstance(keys, list):
            raise CheckpointFormatError("the storage key list is not a list")
        for key in keys:
            if key not in storages:
                raise CheckpointFormatError(f"storage {key} is not referenced by the object")
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointFormatError(f"storage {key} is truncated")
            (count,) = struct.unpack("<q", header)
            if count != storage.numel:
                raise CheckpointFormatError(
                    f"storage {key} holds {count} elements, its tensors declare {storage.numel}"
                )
            itemsize = np.dtype(_raw_dtype(storage.storage_type)).itemsize
            offset = f.tell()
            if offset + count * itemsize > size:
                raise CheckpointFormatError(f"storage {key} is truncated")
            storage.read = _file_reader(path, offset, itemsize, storage.storage_type)
            f.seek(count * itemsize, io.SEEK_CUR)
        missing = sorted(set(storages) - set(keys))
        if missing:
            raise CheckpointFormatError(f"storages {missing[:5]} have no data")
    return obj


def _file_reader(path, offset, itemsize, storage_type):
    def read(count):
        with open(path, "rb") as f:
            f.seek(offset)
            return _storage_array(f.read(count * itemsize), storage_type)

    return read


def _load_plain(f):
    return RestrictedUnpickler(f, _no_storage).load()


def _no_storage(pid):
    raise CheckpointFormatError("storage reference outside the object pickle")


def _raw_dtype(storage_type):
    if not isinstance(storage_type, _StorageType):
        raise CheckpointFormatError(f"storage of unknown type {storage_type!r}")
    return np.uint16 if storage_type.dtype == "bfloat16" else storage_type.dtype


def _materialise(obj):
    """Replaces every `LazyTensor` in nested containers by its array (in place, returns obj).

    Each container is visited once (a pickle can share one list along 2^80 paths or make a
    list contain itself) and nesting deeper than MAX_NESTING is refused.
    """
    return _materialised(obj, {}, 0)


def _materialised(obj, seen, depth):
    if isinstance(obj, LazyTensor):
        return np.asarray(obj)
    if not isinstance(obj, (dict, list, tuple, argparse.Namespace)):
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    if depth >= MAX_NESTING:
        raise CheckpointFormatError(f"containers nested deeper than {MAX_NESTING} levels")
    seen[id(obj)] = obj  # a list inside itself stays the same (mutated) list
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _materialised(value, seen, depth + 1)
    elif isinstance(obj, list):
        obj[:] = [_materialised(v, seen, depth + 1) for v in obj]
    elif isinstance(obj, tuple):
        seen[id(obj)] = tuple(_materialised(v, seen, depth + 1) for v in obj)
    else:
        _materialised(vars(obj), seen, depth + 1)
    return seen[id(obj)]


def count_tensors(obj):
    """How many distinct tensors (LazyTensor or array) nested containers hold; each container
    is counted once however often it is shared, nesting deeper than MAX_NESTING is refused."""
    seen, count, stack = set(), 0, [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (LazyTensor, np.ndarray)):
            count += 1
            continue
        if isinstance(item, argparse.Namespace):
            item = vars(item)
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        else:
            continue
        if depth >= MAX_NESTING:
            raise CheckpointFormatError(f"containers nested deeper than {MAX_NESTING} levels")
        stack.extend((child, depth + 1) for child in children)
    return count


def load(path, lazy=False):
    """The object saved by `torch.save` at `path`.

    Args:
      lazy: False: tensors as NumPy arrays; True: tensors as `LazyTensor`s (shape and dtype
        known, data read by `np.asarray(t)`), so skipped tensors are never read.

    Raises:
      UnsafeCheckpointError: the pickle references a global outside the allow-list.
      CheckpointFormatError: not a (supported) PyTorch checkpoint.
    """
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    return obj if lazy else _materialise(obj)
