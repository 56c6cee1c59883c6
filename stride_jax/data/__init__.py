"""Documents, readers/writers, tokenization into fixed-length rows, splits, embedded corpus."""

from stride_jax.data._corpus import POEMS, list_plays, shakespeare_plays
from stride_jax.data._documents import (
    FORMATS,
    DataError,
    Document,
    detect_format,
    iter_documents,
    read_dir,
    read_documents,
    read_jsonl,
    read_text,
    source_stamp,
    write_jsonl,
)
from stride_jax.data._split import split_ids
from stride_jax.data._tokenize import (
    TokenizedSet,
    load_tokenized,
    tokenize_documents,
    tokenize_to_disk,
)

__all__ = [
    "FORMATS",
    "POEMS",
    "DataError",
    "Document",
    "TokenizedSet",
    "detect_format",
    "iter_documents",
    "list_plays",
    "load_tokenized",
    "read_dir",
    "read_documents",
    "read_jsonl",
    "read_text",
    "shakespeare_plays",
    "source_stamp",
    "split_ids",
    "tokenize_documents",
    "tokenize_to_disk",
    "write_jsonl",
]
