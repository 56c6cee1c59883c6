"""Documents and their on-disk formats (JSON Lines, plain text files, directories of text files)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "Document",
    "read_dir",
    "read_documents",
    "read_jsonl",
    "read_text",
    "write_jsonl",
]


class DataError(ValueError):
    """Bad input data; the message names the file (and line), the problem and the fix."""


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


def read_jsonl(path: str | os.PathLike[str]) -> list[Document]:
    """Read a JSON Lines file: one object per line, in one of two shapes.

    * ``{"id": ..., "text": ...}``: a plain document, every token scored;
    * ``{"id": ..., "prompt": ..., "completion": ...}``: only the completion is scored.

    ``id`` may be a string or an integer (stored as its decimal string). Other fields are ignored.
    Blank lines are skipped. Line numbers in errors are 1-based.
    """
    path = Path(path)
    content = _read_utf8(path)
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
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
        doc = _record_to_document(record, where)
        if doc.id in seen:
            raise DataError(
                f"{path}: duplicate id {doc.id!r} on lines {seen[doc.id]} and {lineno}; ids must be "
                f"unique (rename one of them)"
            )
        seen[doc.id] = lineno
        docs.append(doc)
    if not docs:
        raise DataError(f"{path}: no documents (the file has only blank lines); add at least one line")
    return docs


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
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; pass a directory of .txt files")
    files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"{path}: no *.txt files in this directory; add some or pass a .jsonl file")
    docs = []
    for f in files:
        (doc,) = read_text(f)
        docs.append(Document(id=f.relative_to(path).with_suffix("").as_posix(), text=doc.text))
    return docs


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


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; pass a .jsonl or text file, or a directory")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: the file is empty; add at least one document")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}, byte "
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
