"""Documents and their on-disk formats (JSON Lines, plain text files, directories of text files)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stride_jax.errors import DataError

__all__ = [
    "DataError",
    "Document",
    "iter_documents",
    "read_dir",
    "read_documents",
    "read_jsonl",
    "read_text",
    "source_stamp",
    "write_jsonl",
]


@dataclasses.dataclass(frozen=True)
class Document:
    """One training or query document.

    Attributes:
      id: stable identifier (attribution scores are reported against it).
      text: the text; when ``prompt`` is given, the *completion* that follows the prompt.
      prompt: optional conditioning text. Its tokens are fed to the model but never scored: only
        the completion's tokens (and the eos after them) count towards the loss.
    """

    id: str
    text: str
    prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise TypeError(f"Document.id must be a str, got {type(self.id).__name__}")
        if not isinstance(self.text, str):
            raise TypeError(f"Document.text must be a str, got {type(self.text).__name__}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError(f"Document.prompt must be a str or None, got {type(self.prompt).__name__}")


def read_documents(path: str | os.PathLike[str]) -> list[Document]:
    """Read documents from ``path``: a ``.jsonl`` file, any other (text) file, or a directory.

    See :func:`read_jsonl`, :func:`read_text` and :func:`read_dir`.
    """
    path = Path(path)
    if path.is_dir():
        return read_dir(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    return read_text(path)


def iter_documents(path: str | os.PathLike[str]) -> Iterator[Document]:
    """Yield the documents of ``path`` one at a time, as :func:`read_documents` would list them.

    A ``.jsonl`` file is read line by line (never whole), so it may be larger than memory; its
    validation and error messages are those of :func:`read_jsonl`, raised when the offending line
    is reached (a duplicate id after the documents before it were yielded). A directory is read
    one ``.txt`` file at a time. Any other file is one document (:func:`read_text`), so it is read
    whole: split a large text into a ``.jsonl`` file or a directory to stream it. Problems with
    the path itself (missing, empty, no ``.txt`` files) are raised by this call, not on iteration.
    """
    path = Path(path)
    if path.is_dir():
        return _dir_documents(path, _dir_files(path))
    if path.suffix == ".jsonl":
        _check_file(path)
        return _jsonl_documents(path)
    return iter(read_text(path))


def read_jsonl(path: str | os.PathLike[str]) -> list[Document]:
    """Read a JSON Lines file: one object per line, in one of two shapes.

    * ``{"id": ..., "text": ...}``: a plain document, every token scored;
    * ``{"id": ..., "prompt": ..., "completion": ...}``: only the completion is scored.

    ``id`` may be a string or an integer (stored as its decimal string). Other fields are ignored.
    Blank lines are skipped. Lines end at ``\\n`` (a ``\\r\\n`` ending is fine). Line numbers in
    errors are 1-based.
    """
    path = Path(path)
    _check_file(path)
    return list(_jsonl_documents(path))


def _jsonl_documents(path: Path) -> Iterator[Document]:
    """The documents of the (checked) JSON Lines file ``path``, read one line at a time."""
    seen: dict[str, int] = {}   # id -> line; bounded by the number of ids, not the text
    offset = 0                  # byte offset of the current line, for UTF-8 errors
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_utf8(path, raw, offset=offset, line=lineno)
            offset += len(raw)
            if not line.strip():
                continue
            doc = _line_to_document(line, f"{path}, line {lineno}")
            if doc.id in seen:
                raise DataError(
                    f"{path}: duplicate id {doc.id!r} on lines {seen[doc.id]} and {lineno}; ids "
                    f"must be unique (rename one of them)"
                )
            seen[doc.id] = lineno
            yield doc
    if not seen:
        raise DataError(f"{path}: no documents (the file has only blank lines); add at least one line")


def _line_to_document(line: str, where: str) -> Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line of a .jsonl file "
            f'must be one JSON object such as {{"id": "a", "text": "..."}}'
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object, got {type(record).__name__}; each line must "
            f'look like {{"id": "a", "text": "..."}}'
        )
    return _record_to_document(record, where)


def read_text(path: str | os.PathLike[str]) -> list[Document]:
    """Read a plain text file as one :class:`Document` whose id is the file's stem."""
    path = Path(path)
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file holds only whitespace; give it some text or remove it")
    return [Document(id=path.stem, text=text)]


def read_dir(path: str | os.PathLike[str]) -> list[Document]:
    """Read every ``*.txt`` file under directory ``path`` (recursively), sorted by relative path.

    Each file is one document whose id is its path relative to ``path``, without the suffix and
    with ``/`` separators (``acts/one.txt`` -> ``acts/one``).
    """
    path = Path(path)
    return list(_dir_documents(path, _dir_files(path)))


def source_stamp(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the contents of a document source without reading it: the resolved path,
    total size in bytes and newest modification time (ns) of the file, or of a directory's
    ``*.txt`` files (with their count). A cache of the source's tokenization compares stamps to
    notice an edited source. A path that holds no documents raises :class:`DataError` as
    :func:`read_documents` would (missing, empty, a directory without ``*.txt`` files).
    """
    path = Path(path)
    if not path.is_dir():
        _check_file(path)
    files = _dir_files(path) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    stamp = {"source": str(path.resolve()), "size": sum(s.st_size for s in stats),
             "mtime_ns": max(s.st_mtime_ns for s in stats)}
    if path.is_dir():
        stamp["files"] = len(files)
    return stamp


def _dir_files(path: Path) -> list[Path]:
    """The ``*.txt`` files under directory ``path`` in document order; errors if there are none."""
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; pass a directory of .txt files")
    files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"{path}: no *.txt files in this directory; add some or pass a .jsonl file")
    return files


def _dir_documents(path: Path, files: list[Path]) -> Iterator[Document]:
    for f in files:
        (doc,) = read_text(f)
        yield Document(id=f.relative_to(path).with_suffix("").as_posix(), text=doc.text)


def write_jsonl(docs: Iterable[Document], path: str | os.PathLike[str]) -> Path:
    """Write documents as JSON Lines readable by :func:`read_jsonl`, atomically.

    The file is written to a temporary file in the same directory and moved into place with
    ``os.replace``, so readers never see a half-written file. Returns the path.
    """
    from stride_jax.io.atomic import atomic_path
    path = Path(path)
    # atomic_path: temp file + fsync + rename, and a full disk reported as DiskFullError.
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            if doc.prompt is None:
                record = {"id": doc.id, "text": doc.text}
            else:
                record = {"id": doc.id, "prompt": doc.prompt, "completion": doc.text}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _check_file(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` is an existing, non-empty regular file."""
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; pass a .jsonl or text file, or a directory")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; add at least one document")


def _read_utf8(path: Path) -> str:
    _check_file(path)
    return _decode_utf8(path, path.read_bytes())


def _decode_utf8(path: Path, raw: bytes, *, offset: int = 0, line: int = 1) -> str:
    """``raw`` as UTF-8; ``raw`` starts at byte ``offset``, on line ``line``, of file ``path``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {offset + e.start} (line {line}, byte "
            f"{raw[e.start]:#04x}); re-encode the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8`"
        ) from None


def _record_to_document(record: dict[str, Any], where: str) -> Document:
    if "id" not in record:
        raise DataError(f'{where}: missing field "id"; give every line a unique "id" (string or int)')
    raw_id = record["id"]
    # bool is an int subclass; True as an id is almost surely a mistake.
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise DataError(f'{where}: "id" must be a string or an integer, got {json.dumps(raw_id)}')
    doc_id = str(raw_id)
    if not doc_id.strip():
        raise DataError(f'{where}: "id" is blank; give every line a non-empty unique id')
    has_text = "text" in record
    has_pc = "prompt" in record or "completion" in record
    if has_text and has_pc:
        raise DataError(
            f'{where} (id {doc_id!r}): has both "text" and "prompt"/"completion"; use "text" for a '
            f'plain document or "prompt" + "completion" for a scored completion, not both'
        )
    if not has_text and not has_pc:
        raise DataError(
            f'{where} (id {doc_id!r}): missing field "text" (or "prompt" + "completion"); '
            f"add the document's text"
        )
    if has_text:
        text = _string_field(record, "text", where, doc_id)
        return Document(id=doc_id, text=text)
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(
                f'{where} (id {doc_id!r}): missing field "{key}"; a prompt/completion line needs '
                f'both "prompt" and "completion"'
            )
    prompt = _string_field(record, "prompt", where, doc_id)
    completion = _string_field(record, "completion", where, doc_id)
    return Document(id=doc_id, text=completion, prompt=prompt)


def _string_field(record: dict[str, Any], key: str, where: str, doc_id: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f'{where} (id {doc_id!r}): "{key}" must be a string, got {json.dumps(value)[:40]}'
        )
    if not value.strip():
        raise DataError(
            f'{where} (id {doc_id!r}): blank "{key}"; every document needs non-whitespace text '
            f"(drop the line if it is empty)"
        )
    return value
