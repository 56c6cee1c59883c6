"""File I/O: atomic writes (NaN refused), argument stamps, output directories (checked, stamped,
locked, cleared by --overwrite) and a torch-free safetensors reader/writer (bfloat16 included)."""

from stride_jax.io.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    json_text,
    load_npy,
    save_npy,
    write_json,
)
from stride_jax.io.outdir import (
    OutputLockedError,
    OutputPathError,
    check_output_dir,
    check_output_file,
    complete_output_dir,
    lock_output_dir,
    open_output_dir,
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
    "OutputLockedError",
    "OutputPathError",
    "StaleArtifactError",
    "array_fingerprint",
    "complete_stage",
    "open_stage",
    "SafetensorsError",
    "TensorInfo",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "complete_output_dir",
    "json_text",
    "load_file",
    "lock_output_dir",
    "load_npy",
    "load_sharded",
    "open_output_dir",
    "read_header",
    "save_file",
    "save_npy",
    "write_json",
]
