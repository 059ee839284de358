"""Hostile files for the robustness tests, written without torch.

`write_zip` / `write_legacy` produce `torch.save`-format checkpoints (zip and legacy) from a
dict of `Tensor`s over `Storage`s whose offsets, sizes, strides and declared element counts
are whatever a test wants, including what torch itself would never write. `peak_rss` runs a
snippet in a child process and reports its exit code, output and peak resident memory.
"""

import collections
import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class Global:
    """Pickles as the global `module.name` (a GLOBAL opcode), whether or not it exists here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise TypeError("a stand-in")


class Storage:
    """A storage: its flat data, its key and the element count its pickle declares.

    `raw` replaces the bytes written for it (an int: that many zero bytes, written in chunks,
    for a huge member), `numel` the declared count.
    """

    def __init__(self, key, data, numel=None, raw=None):
        self.key = str(key)
        self.data = np.ascontiguousarray(data).reshape(-1)
        self.numel = self.data.size if numel is None else numel
        self.raw = raw

    @property
    def type_name(self):
        return _STORAGE_NAMES[self.data.dtype]


class Tensor:
    """A tensor view (offset, size, stride in elements) of a `Storage`."""

    def __init__(self, storage, size, stride=None, offset=0):
        self.storage, self.size, self.offset = storage, tuple(size), offset
        self.stride = tuple(stride) if stride is not None else _contiguous(self.size)

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return Global("torch._utils", "_rebuild_tensor_v2"), args


def tensor(array, key, **kwargs):
    """A contiguous `Tensor` holding `array` on a storage of its own."""
    array = np.asarray(array)
    return Tensor(Storage(key, array, **kwargs), array.shape)


def _contiguous(size):
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _Pickler(pickle._Pickler):
    """Protocol-2 pickler writing `Global`s as GLOBAL opcodes and storages as persistent ids."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages[obj.key] = obj
        pid = ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.numel)
        return (*pid, None) if self.legacy else pid


def _save_global(pickler, obj):
    pickler.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())


_Pickler.dispatch[Global] = _save_global


def dumps(obj, legacy=False):
    """(pickle bytes, {key: Storage}) of `obj`."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, legacy)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.storages


def _chunks(storage, size=1 << 22):
    """The bytes written for a storage, in chunks."""
    if isinstance(storage.raw, int):
        for start in range(0, storage.raw, size):
            yield bytes(min(size, storage.raw - start))
        return
    raw = (
        storage.raw
        if storage.raw is not None
        else storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes()
    )
    for start in range(0, len(raw), size):
        yield raw[start : start + size]


def _nbytes(storage):
    if isinstance(storage.raw, int):
        return storage.raw
    return len(storage.raw) if storage.raw is not None else storage.data.nbytes


def write_zip(path, obj, deflate=False):
    """A torch >= 1.6 zip checkpoint of `obj` at `path`; storages are deflated if asked (a
    `raw` of zeros then becomes a small member inflating to its full size)."""
    payload, storages = dumps(obj)
    compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        for key, storage in storages.items():
            with archive.open(f"archive/data/{key}", "w", force_zip64=True) as member:
                for chunk in _chunks(storage):
                    member.write(chunk)
    return str(path)


def write_legacy(path, obj):
    """A legacy (torch < 1.6) checkpoint of `obj` at `path`."""
    payload, storages = dumps(obj, legacy=True)
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(payload)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            storage = storages[key]
            f.write(struct.pack("<q", _nbytes(storage) // storage.data.itemsize))
            for chunk in _chunks(storage):
                f.write(chunk)
    return str(path)


_RSS_WRAPPER = """
import json, resource, subprocess, sys
try:
    child = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True,
                           env=json.loads(sys.argv[2]), timeout=float(sys.argv[3]))
    out = {"returncode": child.returncode, "stdout": child.stdout, "stderr": child.stderr}
except subprocess.TimeoutExpired:  # run() has killed the child
    out = {"returncode": None, "stdout": "", "stderr": "", "timed_out": True}
out["peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
"""


def peak_rss(code, env, timeout=300):
    """Runs `python -c code`; its {"returncode", "stdout", "stderr", "peak_mb"} (and
    "timed_out": True, returncode None, when it was killed after `timeout` seconds).

    The snippet runs as the only child of a small wrapper, so RUSAGE_CHILDREN's peak is the
    snippet's alone (the test process' own children would mix in otherwise).
    """
    out = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, code, json.dumps(env), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        check=True,
    )
    return json.loads(out.stdout)


def write_png(path, width, height, rows=None):
    """A greyscale 8-bit PNG claiming `width` x `height`. Its pixel data are zeros, deflated
    in chunks (a 10000 x 10000 image is a ~100 KB file that decodes to 100 Mpx); `rows`
    limits how many rows are actually stored (fewer makes a header-only bomb, faster to
    write, that a decoder would reject only after allocating the image)."""
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0 + the row's pixels
    idat = []
    for _ in range(height if rows is None else rows):
        idat.append(compressor.compress(row))
    idat.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr))
        f.write(chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))
    return str(path)
