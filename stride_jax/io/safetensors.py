"""Reading and writing ``.safetensors`` files with numpy only (no torch), bfloat16 included.

File layout (https://github.com/huggingface/safetensors):

====================  ===========================================================================
bytes ``[0, 8)``      header size ``N`` as a little-endian unsigned 64-bit integer
bytes ``[8, 8+N)``    UTF-8 JSON object ``{name: {"dtype": "F32", "shape": [2, 3],
                      "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}``;
                      the writer pads it with trailing spaces so the data starts 8-byte aligned
bytes ``[8+N, ...)``  the raw little-endian, C-ordered tensor data; ``data_offsets`` are relative
                      to the end of the header and ``end - begin == prod(shape) * itemsize``
====================  ===========================================================================

The official ``safetensors.numpy`` backend cannot represent bfloat16 and reports damaged files
with terse messages; this module uses ``ml_dtypes.bfloat16`` and says what is wrong and what to do.

A sharded checkpoint (as written by ``transformers``) is a directory holding
``model.safetensors.index.json`` = ``{"metadata": {...}, "weight_map": {name: shard_filename}}``
plus the shard files; :func:`load_sharded` reads it, or a single ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from stride_jax.errors import SafetensorsError
from stride_jax.io.atomic import atomic_path

__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "SafetensorsError",
    "TensorInfo",
    "load_file",
    "load_sharded",
    "read_header",
    "save_file",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype code -> numpy dtype (little-endian; byte order is fixed by the format).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Keyed on the byte-order-free dtype so that big-endian input arrays still find their code.
_CODES: dict[np.dtype, str] = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}

# The reference implementation refuses headers above 100 MB; a larger value means garbage.
_MAX_HEADER = 100_000_000
_METADATA_KEY = "__metadata__"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``data_offsets`` are relative to the first byte after the header;
    ``data_start`` is the absolute file offset of the first data byte (``8 + N``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    data_start: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def file_range(self) -> tuple[int, int]:
        """Absolute ``[begin, end)`` byte range of the tensor's data in the file."""
        return self.data_start + self.data_offsets[0], self.data_start + self.data_offsets[1]


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: header entry must be an object, got {entry!r}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise SafetensorsError(f"{where}: header entry lacks {missing}")
    dtype = entry["dtype"]
    if dtype not in DTYPES:
        raise SafetensorsError(
            f"{where}: unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsError(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but dtype "
            f"{dtype} with shape {shape} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]), data_start)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file without reading tensor data.

    Returns ``(tensors, metadata)``: ``tensors`` maps each name to its :class:`TensorInfo` in
    header order, ``metadata`` is the ``__metadata__`` object (``{}`` when absent). Raises
    :class:`SafetensorsError` when the file is missing, truncated, not a safetensors file, names
    an unknown dtype, or has data offsets inconsistent with a shape or beyond the end of the file.
    """
    p = Path(path)
    if not p.is_file():
        raise SafetensorsError(f"safetensors file not found: {p}")
    file_size = p.stat().st_size
    if file_size < 8:
        raise SafetensorsError(
            f"{p}: file has {file_size} bytes, fewer than the 8-byte header size prefix; "
            "truncated or not a safetensors file: re-download or re-export the checkpoint"
        )
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > file_size - 8 or n > _MAX_HEADER:
            raise SafetensorsError(
                f"{p}: header size {n} is larger than the file ({file_size} bytes); "
                "truncated or not a safetensors file: re-download or re-export the checkpoint"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{p}: header is not valid UTF-8 JSON ({e}); not a safetensors "
                               f"file, or a damaged one: re-download or re-export the "
                               f"checkpoint") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{p}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop(_METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(f"{p}: __metadata__ must map strings to strings, got {metadata!r}")

    data_start = 8 + n
    tensors = {name: _parse_entry(p, name, entry, data_start) for name, entry in header.items()}
    if tensors:
        needed = data_start + max(t.data_offsets[1] for t in tensors.values())
        if needed > file_size:
            raise SafetensorsError(
                f"{p}: truncated: expected at least {needed} bytes, file has {file_size}; "
                "re-download or re-export the checkpoint"
            )
    return tensors, dict(metadata)


def _unknown_names(path: Path, missing: Iterable[str], available: Iterable[str]) -> SafetensorsError:
    available = sorted(available)
    missing = list(missing)
    hint = difflib.get_close_matches(missing[0], available, n=3)
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
    msg = f"{path}: no tensor(s) named {missing}"
    if hint:
        msg += f"; did you mean {hint}?"
    return SafetensorsError(f"{msg} (file has {len(available)}: {shown})")


def load_file(
    path: str | os.PathLike[str], names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Load tensors from a safetensors file into writable, native-byte-order numpy arrays.

    ``names`` selects a subset (all tensors when ``None``); only their byte ranges are read. The
    arrays own their memory, so nothing keeps the file open. bfloat16 and float8 tensors come
    back as ``ml_dtypes`` arrays.
    """
    p = Path(path)
    infos, _ = read_header(p)
    if names is None:
        wanted = list(infos)
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in infos]
        if missing:
            raise _unknown_names(p, missing, infos)
    out: dict[str, np.ndarray] = {}
    with open(p, "rb") as f:
        # Reading in file order keeps the access sequential for large checkpoints.
        for name in sorted(wanted, key=lambda n: infos[n].data_offsets[0]):
            info = infos[name]
            begin, end = info.file_range
            buf = bytearray(end - begin)
            f.seek(begin)
            got = f.readinto(buf)
            if got != len(buf):  # file shrank after read_header validated it
                raise SafetensorsError(
                    f"{p}: truncated: expected at least {end} bytes, file has {begin + got}; "
                    "re-download or re-export the checkpoint"
                )
            arr = np.frombuffer(buf, dtype=info.np_dtype).reshape(info.shape)
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            out[name] = arr
    return {name: out[name] for name in wanted}


def _code_for(name: str, arr: np.ndarray) -> str:
    code = _CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise SafetensorsError(
            f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent "
            f"(supported: {', '.join(str(d) for d in _CODES)})"
        )
    return code


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, atomically.

    Like the reference writer, the JSON header is padded with spaces to a multiple of 8 bytes and
    the data is laid out by decreasing itemsize, then by name, so every tensor starts aligned to
    its itemsize (lets readers map it without copying). Any array-like (e.g. a JAX array) is
    accepted; it is written C-ordered and little-endian. ``metadata`` must map strings to strings.
    """
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(f"metadata must map strings to strings, got {dict(metadata)!r}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise SafetensorsError(f"tensor names must be non-empty strings, got {name!r}")
        if name == _METADATA_KEY:
            raise SafetensorsError(f"{_METADATA_KEY!r} is reserved and cannot name a tensor")
        arr = np.asarray(value)
        code = _code_for(name, arr)
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
        arrays[name] = arr.astype(DTYPES[code], order="C", copy=False)

    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict[str, object] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {
            "dtype": _code_for(name, arr),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                arr = arrays[name]
                if arr.size:
                    # reshape(-1) of a contiguous array is a view; memoryview avoids a bytes copy.
                    f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def load_sharded(
    directory: str | os.PathLike[str], names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Load a checkpoint directory: ``model.safetensors`` or, if absent, the shards listed in
    ``model.safetensors.index.json`` (``{"weight_map": {tensor_name: shard_filename}}``).

    ``names`` optionally restricts which tensors are read. Raises :class:`SafetensorsError` when
    the directory holds neither file (listing what it does hold), the index is malformed or names
    a shard file that does not exist, or a shard lacks a tensor the index assigns to it.
    """
    d = Path(directory)
    if not d.is_dir():
        raise SafetensorsError(f"checkpoint directory not found: {d}")
    single = d / SINGLE_FILE
    if single.is_file():
        return load_file(single, names)
    index_path = d / INDEX_FILE
    if not index_path.is_file():
        present = sorted(x.name for x in d.iterdir())
        raise SafetensorsError(
            f"{d}: neither {SINGLE_FILE} nor {INDEX_FILE} found; the directory holds "
            f"{present if present else 'nothing'}: re-export the model or copy its weights there"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{index_path}: not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SafetensorsError(f"{index_path}: expected a 'weight_map' object of name -> shard file")

    if names is None:
        wanted = list(weight_map)
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in weight_map]
        if missing:
            raise _unknown_names(index_path, missing, weight_map)

    by_shard: dict[str, list[str]] = {}
    for name in wanted:
        by_shard.setdefault(weight_map[name], []).append(name)
    for shard in by_shard:
        if not (d / shard).is_file():
            raise SafetensorsError(
                f"{index_path} names shard {shard!r}, which is not in {d}; "
                "the download is incomplete — re-download the checkpoint"
            )

    out: dict[str, np.ndarray] = {}
    for shard, shard_names in by_shard.items():
        shard_path = d / shard
        infos, _ = read_header(shard_path)
        absent = [n for n in shard_names if n not in infos]
        if absent:
            raise SafetensorsError(
                f"{index_path} assigns {absent[:5]}{' ...' if len(absent) > 5 else ''} to "
                f"{shard!r}, but that shard has no such tensor(s); index and shards disagree"
            )
        out.update(load_file(shard_path, shard_names))
    return {name: out[name] for name in wanted}
