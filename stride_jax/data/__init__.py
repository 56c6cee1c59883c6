"""Documents, readers/writers, tokenization into fixed-length rows, splits, embedded corpus."""

from stride_jax.data._corpus import POEMS, list_plays, shakespeare_plays
from stride_jax.data._documents import (
    DataError,
    Document,
    read_dir,
    read_documents,
    read_jsonl,
    read_text,
    write_jsonl,
)
from stride_jax.data._split import split_ids
from stride_jax.data._tokenize import TokenizedSet, tokenize_documents

__all__ = [
    "POEMS",
    "DataError",
    "Document",
    "TokenizedSet",
    "list_plays",
    "read_dir",
    "read_documents",
    "read_jsonl",
    "read_text",
    "shakespeare_plays",
    "split_ids",
    "tokenize_documents",
    "write_jsonl",
]
