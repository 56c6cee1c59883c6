"""File I/O: atomic writes and a torch-free safetensors reader/writer (bfloat16 included)."""

from stride_jax.io.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    load_npy,
    save_npy,
)
from stride_jax.io.stamps import StaleArtifactError, array_fingerprint, complete_stage, open_stage
from stride_jax.io.safetensors import (
    SafetensorsError,
    TensorInfo,
    load_file,
    load_sharded,
    read_header,
    save_file,
)

__all__ = [
    "StaleArtifactError",
    "array_fingerprint",
    "complete_stage",
    "open_stage",
    "SafetensorsError",
    "TensorInfo",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_file",
    "load_npy",
    "load_sharded",
    "read_header",
    "save_file",
    "save_npy",
]
