"""Flower ``Array`` <-> torch tensor, with every size a sender declares checked against its bytes.

An ``Array`` carries ``dtype``, ``shape``, ``stype`` and ``data``; for ``stype="numpy.ndarray"`` the
data is an ``.npy`` file with a header of its own. ``Array.numpy()`` (``np.load``) trusts that
header: it allocates the array the header declares before reading the data, so a 200-byte array
declaring 2**34 elements asks for 64 GiB, and an empty one raises ``EOFError``. Here the header is
read with numpy's bounded header parser, and the array is refused (``AdapterFormatError``, naming
the array) unless header and ``Array`` fields agree, the dtype is a plain number type, and the data
holds exactly ``prod(shape) * itemsize`` bytes. Only then is it wrapped (``np.frombuffer``) and
copied: decoding allocates what was received, no more. Shapes are checked against the layers of a
reference adapter in :func:`hf_fedlora.flower.records.check_shapes` before any array is decoded.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array

from ..errors import AdapterFormatError

NUMPY_STYPE = "numpy.ndarray"
"""Flower's serialisation type of ``Array.from_numpy_ndarray`` (an ``.npy`` file)."""
RAW_STYPE = "hf_fedlora.torch.raw"
"""numpy has no bfloat16: such tensors travel as their raw bytes under this serialisation type."""
RAW_DTYPES = {"bfloat16": torch.bfloat16}
MAX_NDIM = 8
"""Dimensions an array may declare (LoRA factors have 2, a convolution's 4)."""
_NPY_HEADER_BYTES = 10_000  # numpy's own default limit for np.load
_NUMBER_KINDS = "fiub"  # float, signed and unsigned int, bool: no objects, strings, records, complex


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """A Flower ``Array`` holding exactly the tensor's bytes; ``bfloat16`` included."""
    tensor = tensor.detach().cpu().contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name in RAW_DTYPES:
        data = tensor.view(torch.int16).numpy().tobytes()
        return Array(dtype=name, shape=tuple(tensor.shape), stype=RAW_STYPE, data=data)
    return Array.from_numpy_ndarray(tensor.numpy())


def declared_shape(array: Array, where: str = "array") -> tuple[int, ...]:
    """The shape an ``Array`` declares, refused unless it is at most ``MAX_NDIM`` non-negative ints."""
    shape = getattr(array, "shape", None)
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise AdapterFormatError(
            f"{where} declares shape {shape!r:.80}; an array's shape is at most {MAX_NDIM} non-negative ints."
        )
    return tuple(shape)


def _check_size(where: str, shape: tuple[int, ...], dtype: str, itemsize: int, nbytes: int) -> None:
    expected = math.prod(shape) * itemsize
    if expected != nbytes:
        raise AdapterFormatError(
            f"{where} declares shape {list(shape)} of {dtype} ({expected:,} bytes) but its data holds "
            f"{nbytes:,} bytes; refusing to decode it."
        )


def _npy_header(data: bytes, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data_offset)`` of an ``.npy`` buffer, the header bounded."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(buffer, max_header_size=_NPY_HEADER_BYTES)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(buffer, max_header_size=_NPY_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, TypeError, SyntaxError, OverflowError, MemoryError, RecursionError) as exc:
        raise AdapterFormatError(
            f"{where} holds no readable .npy array ({len(data):,} bytes; {exc!s:.200})."
        ) from None
    shape, fortran, dtype = header
    return tuple(shape), bool(fortran), dtype, buffer.tell()


def _numpy_array(array: Array, shape: tuple[int, ...], where: str) -> np.ndarray:
    data = array.data
    header_shape, fortran, dtype, offset = _npy_header(data, where)
    if dtype.kind not in _NUMBER_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype:
        raise AdapterFormatError(f"{where} holds dtype {str(dtype)!r:.60}; a LoRA tensor holds numbers.")
    try:
        declared = np.dtype(array.dtype)
    except (TypeError, ValueError):
        declared = None
    if declared != dtype or header_shape != shape:
        raise AdapterFormatError(
            f"{where} declares dtype {array.dtype!r:.40} and shape {list(shape)} but its .npy header says "
            f"{str(dtype)!r} and {list(header_shape)[: MAX_NDIM + 1]}."
        )
    _check_size(where, shape, str(dtype), dtype.itemsize, len(data) - offset)
    if not math.prod(shape):
        return np.empty(shape, dtype=dtype.newbyteorder("="))
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    values = flat.reshape(shape, order="F" if fortran else "C")
    return np.array(values, dtype=dtype.newbyteorder("="), order="C", copy=True)


def array_to_tensor(array: Array, where: str = "array") -> torch.Tensor:
    """The tensor an ``Array`` holds (a fresh, writable copy), after checking its declared dtype and
    shape against its bytes (see the module's docstring).

    Raises:
        AdapterFormatError: naming ``where``: an unsupported ``stype`` or dtype, a shape or header
            that does not match the data, an unreadable ``.npy`` buffer.
    """
    shape = declared_shape(array, where)
    data = getattr(array, "data", None)
    if not isinstance(data, (bytes, bytearray)):
        raise AdapterFormatError(f"{where} holds {type(data).__name__} data, not bytes.")
    stype = getattr(array, "stype", None)
    if stype == RAW_STYPE:
        dtype = RAW_DTYPES.get(array.dtype) if isinstance(array.dtype, str) else None
        if dtype is None:
            raise AdapterFormatError(f"{where} is a raw array of unsupported dtype {array.dtype!r:.40}.")
        _check_size(where, shape, array.dtype, torch.empty((), dtype=dtype).element_size(), len(data))
        if not data:
            return torch.empty(shape, dtype=dtype)  # no elements
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    if stype != NUMPY_STYPE:
        raise AdapterFormatError(
            f"{where} has serialisation type {stype!r:.60}, not supported ('{NUMPY_STYPE}' or '{RAW_STYPE}')."
        )
    return torch.from_numpy(_numpy_array(array, shape, where))


__all__ = [
    "MAX_NDIM",
    "NUMPY_STYPE",
    "RAW_DTYPES",
    "RAW_STYPE",
    "array_to_tensor",
    "declared_shape",
    "tensor_to_array",
]
