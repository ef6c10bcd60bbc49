"""Reading and writing adapter files: lazy safetensors access, JSON, hashes, atomic output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy
import torch
from safetensors import safe_open

from ..constants import MAX_SAFETENSORS_HEADER_BYTES
from ..errors import AdapterFormatError, AdapterNotFoundError
from ..files import open_regular, parse_json, read_small_text

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}


class TensorStore(Protocol):
    """Read-only access to named tensors, one at a time."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype | None: ...

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor: ...


class MemoryStore:
    """Tensors already in memory (an adapter built in Python or taken from a ``PeftModel``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        return self._tensors[key].dtype

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor if out is None else _view_bytes(out, tensor.dtype, tensor.shape).copy_(tensor)


def _view_bytes(out: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 tensor ``out`` seen as a ``dtype`` tensor of ``shape`` (checked)."""
    _check_out(out, torch.Size(shape).numel() * dtype.itemsize, "`out`")
    return out.view(dtype).view(shape)


def _check_out(out: torch.Tensor, nbytes: int, where: str) -> None:
    """Refuse a read buffer that is not a contiguous uint8 tensor of exactly ``nbytes``."""
    if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() != nbytes:
        raise ValueError(
            f"{where} must be a contiguous uint8 tensor of {nbytes} bytes, got {out.dtype} of {out.numel()} values."
        )


class SafetensorsStore:
    """A safetensors file read lazily: the header at open, each tensor only when asked for.

    The file is validated by ``safetensors.safe_open`` once; tensors are then read with plain
    positioned reads rather than a memory map, so pages of already-merged modules do not stay in
    the process's resident memory while the other modules of many clients are read.
    """

    def __init__(self, path: str | os.PathLike, where: str):
        self.path = Path(path)
        self._where = where
        where_file = f"{where}, file '{self.path.name}'"
        fd = open_regular(self.path, where)  # a regular file: a FIFO or a link loop is refused here
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if length > MAX_SAFETENSORS_HEADER_BYTES or length > size - 8:
                raise AdapterFormatError(
                    f"{where_file}: its header declares {length:,} bytes ("
                    + (
                        "over the limit of " + f"{MAX_SAFETENSORS_HEADER_BYTES:,}"
                        if length > MAX_SAFETENSORS_HEADER_BYTES
                        else f"the file has {size:,}"
                    )
                    + "); not read. The upload was probably truncated or forged: send the adapter again."
                )
            raw_header = handle.read(max(length, 0))
        try:
            with safe_open(str(self.path), framework="pt", device="cpu"):
                pass  # full header validation: offsets, sizes, dtypes
            header = json.loads(raw_header)
        except FileNotFoundError as exc:
            raise AdapterNotFoundError(f"{where}: weights file '{self.path}' does not exist.") from exc
        except Exception as exc:  # safetensors raises its own error type for every kind of corruption
            raise AdapterFormatError(
                f"{where_file}: not a valid safetensors file ({exc}). "
                "The upload was probably truncated or corrupted: send the adapter again."
            ) from exc
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = {
            key: (info["dtype"], tuple(info["shape"]), *info["data_offsets"]) for key, info in header.items()
        }
        self._keys = sorted(self._entries)
        self._hasher: FileSha256 | None = None
        self._held: int | None = None  # a descriptor kept open by held_open()

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self._entries[key][0])

    def dtype_name(self, key: str) -> str:
        """The dtype as the header spells it (e.g. ``F8_E8M0``), for messages about unreadable ones."""
        return str(self._entries[key][0])

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read with one positioned read (no memory map) and fed to the file's running
        sha256 when :meth:`hash_reads` started one; into ``out`` (uint8, the tensor's size in bytes,
        e.g. a slot of a reused buffer) when given, else into new memory."""
        dtype_name, _shape, start, end = self._entries[key]
        if _SAFETENSORS_DTYPES.get(dtype_name) is None:
            raise AdapterFormatError(
                f"{self._where}, file '{self.path.name}': tensor `{key}` has dtype {dtype_name}, "
                "which this torch cannot read."
            )
        return self._read([key], start, end, out)[0]

    def _read(
        self, keys: list[str], first: int, last: int, out: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        where = f"{self._where}, file '{self.path.name}': tensor `{keys[0]}`"
        if out is not None:
            _check_out(out, last - first, f"{where}: `out`")
        # filled by the read: not zeroed first
        buffer = numpy.empty(last - first, dtype=numpy.uint8) if out is None else out.numpy()
        try:
            fd = self._held if self._held is not None else open_regular(self.path, self._where)
            try:
                got = os.preadv(fd, [buffer], self._data_start + first) if len(buffer) else 0
            finally:
                if fd != self._held:
                    os.close(fd)
        except OSError as exc:
            raise AdapterFormatError(f"{where} cannot be read ({exc}).") from exc
        if got != len(buffer):
            raise AdapterFormatError(
                f"{where}: the file ended early (it changed or was truncated after it was opened)."
            )
        if self._hasher is not None:
            self._hasher.feed(self._data_start + first, buffer)
        out = []
        for key in keys:
            dtype_name, shape, start, end = self._entries[key]
            dtype = _SAFETENSORS_DTYPES[dtype_name]
            if end == start:
                out.append(torch.empty(shape, dtype=dtype))
            else:
                view = buffer[start - first : end - first]
                out.append(torch.frombuffer(memoryview(view), dtype=dtype).reshape(shape))
        return out

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Keep one descriptor of the file open for the reads inside the block (checked as a regular
        file once), instead of opening it for every tensor."""
        if self._held is not None:
            yield
            return
        self._held = open_regular(self.path, self._where)
        try:
            yield
        finally:
            os.close(self._held)
            self._held = None

    def hash_reads(self) -> None:
        """Start a sha256 of the file computed from the bytes later reads return, so that
        :meth:`sha256` reads only what no tensor read covered (the header, skipped tensors)."""
        self._hasher = FileSha256(self.path, self._where)

    def sha256(self) -> str:
        """Hex sha256 of the file: finishes the one :meth:`hash_reads` started, else reads it all."""
        hasher, self._hasher = self._hasher, None
        return hasher.hexdigest() if hasher is not None else sha256_file(self.path)


class FileSha256:
    """The sha256 of a file built from reads made for other reasons, in file order.

    Bytes fed at the current end of the hashed prefix extend it; a gap before a read is read and
    hashed first; a read behind the prefix (out of order) makes :meth:`hexdigest` hash the whole file
    again, so the digest is always that of the file's bytes. Reads may come from two threads (the
    merge's read-ahead and the merging thread's dense terms): each feed holds a lock.
    """

    def __init__(self, path: Path, where: str):
        self.path, self._where = path, where
        self._digest = hashlib.sha256()
        self._done = 0
        self._in_order = True
        self._lock = threading.Lock()

    def feed(self, offset: int, data: bytes | bytearray | numpy.ndarray) -> None:
        with self._lock:
            if not self._in_order or offset < self._done:
                self._in_order = False
                return
            if offset > self._done:
                self._hash_range(self._done, offset)
            self._digest.update(data)
            self._done = offset + len(data)

    def _hash_range(self, start: int, end: int | None) -> None:
        fd = open_regular(self.path, self._where)
        with os.fdopen(fd, "rb") as handle:
            handle.seek(start)
            while end is None or start < end:
                block = handle.read(1 << 20 if end is None else min(1 << 20, end - start))
                if not block:
                    break
                self._digest.update(block)
                start += len(block)
        self._done = start

    def hexdigest(self) -> str:
        with self._lock:
            if not self._in_order:
                return sha256_file(self.path)
            self._hash_range(self._done, None)
            return self._digest.hexdigest()


def load_pickle(path: Path, label: str) -> MemoryStore:
    """A trusted pickle weights file (``adapter_model.bin``), read with ``torch.load(weights_only=True)``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFormatError(
            f"{label}, file '{path.name}': cannot be read as a weights-only torch file ({exc})."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(
            f"{label}, file '{path.name}': expected a mapping of tensor names to tensors."
        )
    return MemoryStore(state)


def read_json(path: str | os.PathLike, where: str, what: str) -> dict[str, Any]:
    """Parse a JSON object from ``path``; errors name the client, the file and what it should hold."""
    path = Path(path)
    try:
        text = read_small_text(path, where)
    except AdapterNotFoundError as exc:
        raise AdapterNotFoundError(f"{where}: {what} '{path.name}' is missing from '{path.parent}'.") from exc
    data = parse_json(text, where, what, path.name)
    if not isinstance(data, dict):
        raise AdapterFormatError(
            f"{where}, file '{path.name}': {what} must be a JSON object, got {type(data).__name__}."
        )
    return data


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON with a trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target`` in one rename.

    Readers never see a half-written folder, nor files of two saves mixed (a config of one round
    beside the weights of another). If ``target`` exists, its files that the new save does not
    write are linked into the new folder first (as PEFT's ``save_pretrained`` keeps them), then the
    two folders are exchanged atomically (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old
    folder is renamed aside just before the new one takes its name) and the old one is removed. If
    the body raises, the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.is_dir() and not target.is_symlink():
            _keep_other_files(target, tmp)
            if not _exchange(tmp, target):
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, aside / "old")
                os.rename(tmp, target)
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)  # atomic; refuses a non-empty target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _keep_other_files(old: Path, new: Path) -> None:
    for path in old.iterdir():
        if not (new / path.name).exists() and not path.name.startswith(".") and path.is_file():
            try:
                os.link(path, new / path.name)
            except OSError:
                shutil.copy2(path, new / path.name)
        elif path.is_dir() and not path.is_symlink() and not (new / path.name).exists():
            shutil.copytree(path, new / path.name, symlinks=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux ``renameat2``); False where that is unavailable."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0
