"""Documents and their on-disk formats (JSON Lines, plain text files, directories of text files).

A file's format is decided by its content, never by its name alone (:func:`detect_format`): a
file is JSON Lines when its first non-blank line is a JSON object (or its name ends in ``.jsonl``
or ``.ndjson``), and plain text otherwise, so a JSON Lines file named ``train.json`` or
``train`` is not trained on as raw text. Binary files (compressed archives, NumPy arrays, UTF-16
text, anything holding NUL bytes) and whole JSON documents (one array) are refused with what to
do. A UTF-8 byte order mark at the start of a file is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Format = Literal["auto", "jsonl", "text"]
FORMATS = ("auto", "jsonl", "text")

from stride_jax.errors import ConfigError, DataError

__all__ = [
    "DataError",
    "Document",
    "FORMATS",
    "detect_format",
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


def read_documents(path: str | os.PathLike[str], *, format: Format = "auto") -> list[Document]:
    """Read documents from ``path``: a JSON Lines file, any other (text) file, or a directory.

    ``format`` "auto" decides by content (:func:`detect_format`); "jsonl" or "text" forces one.
    See :func:`read_jsonl`, :func:`read_text` and :func:`read_dir`.
    """
    return list(iter_documents(path, format=format))


def iter_documents(path: str | os.PathLike[str], *, format: Format = "auto") -> Iterator[Document]:
    """Yield the documents of ``path`` one at a time, as :func:`read_documents` would list them.

    A JSON Lines file is read line by line (never whole), so it may be larger than memory; its
    validation and error messages are those of :func:`read_jsonl`, raised when the offending line
    is reached (a duplicate id after the documents before it were yielded). A directory is read
    one ``.txt`` file at a time. Any other file is one document (:func:`read_text`), so it is read
    whole: split a large text into a JSON Lines file or a directory to stream it. Problems with
    the path itself (missing, empty, binary, no ``.txt`` files) are raised by this call, not on
    iteration.
    """
    path = Path(path)
    kind = detect_format(path, format=format)
    if kind == "dir":
        files, skipped = _dir_files(path)
        _warn_skipped(path, skipped)
        return _dir_documents(path, files, format)
    if kind == "jsonl":
        return _jsonl_documents(path, sniffed=format == "auto" and not _jsonl_name(path))
    return iter(read_text(path))


def detect_format(path: str | os.PathLike[str], *, format: Format = "auto"
                  ) -> Literal["jsonl", "text", "dir"]:
    """What ``path`` holds: ``"dir"`` (a directory of ``.txt`` files), ``"jsonl"`` or ``"text"``.

    With ``format="auto"`` a file is JSON Lines when its name ends in ``.jsonl``/``.ndjson`` or
    its first non-blank line starts with ``{`` (a JSON object), and text otherwise. Raises
    :class:`DataError` for a missing or empty file and for content that is neither: binary data
    (a known binary signature or a NUL byte in the first 64 KiB: compressed files, NumPy arrays,
    UTF-16/32 text) or a whole JSON document (an array) rather than one object per line.
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    if path.is_dir():
        return "dir"
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    _check_not_binary(path, head)
    if format != "auto":
        return format
    if _jsonl_name(path):
        return "jsonl"
    first = _first_line(head)
    if first.startswith("{\\rtf"):
        raise DataError(f"{path}: an RTF document, not JSON Lines or plain text; save it as plain "
                        f"text (.txt) or convert it to JSON Lines")
    if first.startswith("{"):
        return "jsonl"
    if re.match(r"\[\s*(\{|\[|$)", first):
        raise DataError(
            f"{path}: one JSON document (an array), not JSON Lines; write one JSON object per "
            f'line such as {{"id": "a", "text": "..."}} (e.g. `jq -c \'.[]\' {path.name} > '
            f"{path.stem}.jsonl`)")
    return "text"


# Bytes read to decide a file's format, and signatures of binary formats users pass by mistake.
_SNIFF_BYTES = 1 << 16
_SIGNATURES = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first (gunzip)"),
    (b"BZh", "a bzip2-compressed file", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive", "extract it and pass the JSON Lines or text file"),
    (b"PAR1", "a Parquet file", "export it to JSON Lines"),
    (b"\x93NUMPY", "a NumPy array", "pass the documents as JSON Lines or text"),
    (b"%PDF-", "a PDF document", "extract its text into a .txt file"),
    (b"\xef\xbb\xbf\x00", "binary data after a byte order mark", "pass UTF-8 text"),
    (b"\xff\xfe\x00\x00", "UTF-32 text", "re-encode it as UTF-8 (`iconv -f utf-32 -t utf-8`)"),
    (b"\x00\x00\xfe\xff", "UTF-32 text", "re-encode it as UTF-8 (`iconv -f utf-32 -t utf-8`)"),
    (b"\xff\xfe", "UTF-16 text", "re-encode it as UTF-8 (`iconv -f utf-16 -t utf-8`)"),
    (b"\xfe\xff", "UTF-16 text", "re-encode it as UTF-8 (`iconv -f utf-16 -t utf-8`)"),
)
_BOM = "\ufeff"


def _jsonl_name(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _check_not_binary(path: Path, head: bytes) -> None:
    """Refuse a file whose first bytes are a binary format, or hold a NUL byte."""
    for magic, what, fix in _SIGNATURES:
        if head.startswith(magic):
            raise DataError(f"{path}: {what}, not JSON Lines or UTF-8 text; {fix}")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path}: binary data (a NUL byte at byte offset {nul}), not JSON Lines or UTF-8 "
            f"text; pass a .jsonl or text file (UTF-16 text: re-encode it as UTF-8)")


def _first_line(head: bytes) -> str:
    """The first non-blank line of ``head`` (stripped, BOM dropped; '' if none)."""
    text = head.decode("utf-8", errors="replace").lstrip(_BOM)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def read_jsonl(path: str | os.PathLike[str]) -> list[Document]:
    """Read a JSON Lines file: one object per line, in one of two shapes.

    * ``{"id": ..., "text": ...}``: a plain document, every token scored;
    * ``{"id": ..., "prompt": ..., "completion": ...}``: only the completion is scored.

    ``id`` may be a string or an integer (stored as its decimal string). Other fields are ignored.
    Blank lines are skipped. Lines end at ``\\n`` (a ``\\r\\n`` ending is fine). Line numbers in
    errors are 1-based.
    """
    path = Path(path)
    detect_format(path, format="jsonl")
    return list(_jsonl_documents(path))


def _jsonl_documents(path: Path, *, sniffed: bool = False) -> Iterator[Document]:
    """The documents of the (checked) JSON Lines file ``path``, read one line at a time.
    ``sniffed``: the format was guessed from the content, so errors say how to read it as text."""
    seen: dict[str, int] = {}   # id -> line; bounded by the number of ids, not the text
    offset = 0                  # byte offset of the current line, for UTF-8 errors
    hint = (" (the file is read as JSON Lines because its first line is a JSON object; "
            "format='text', on the command line data.format=text, reads it as plain text)"
            if sniffed else "")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_utf8(path, raw, offset=offset, line=lineno)
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            try:
                doc = _line_to_document(line, f"{path}, line {lineno}")
            except DataError as e:
                raise DataError(f"{e}{hint}") from None
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
            f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line of a JSON Lines "
            f'file must be one JSON object such as {{"id": "a", "text": "..."}}'
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object, got {type(record).__name__}; each line must "
            f'look like {{"id": "a", "text": "..."}}'
        )
    return _record_to_document(record, where)


def read_text(path: str | os.PathLike[str]) -> list[Document]:
    """Read a plain text file as one :class:`Document` whose id is the file's stem (binary
    content is refused, a leading byte order mark dropped)."""
    path = Path(path)
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file holds only whitespace; give it some text or remove it")
    return [Document(id=path.stem, text=text)]


def read_dir(path: str | os.PathLike[str], *, format: Format = "auto") -> list[Document]:
    """Read every ``*.txt`` file under directory ``path`` (recursively), sorted by relative path.

    Each file is one document whose id is its path relative to ``path``, without the suffix and
    with ``/`` separators (``acts/one.txt`` -> ``acts/one``). Other files are skipped with a
    warning that names them. A ``.txt`` file that holds JSON Lines is refused (it would be
    trained on as JSON syntax) unless ``format="text"``.
    """
    path = Path(path)
    files, skipped = _dir_files(path)
    _warn_skipped(path, skipped)
    return list(_dir_documents(path, files, format))


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
    files = _dir_files(path)[0] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    stamp = {"source": str(path.resolve()), "size": sum(s.st_size for s in stats),
             "mtime_ns": max(s.st_mtime_ns for s in stats)}
    if path.is_dir():
        stamp["files"] = len(files)
    return stamp


def _dir_files(path: Path) -> tuple[list[Path], list[Path]]:
    """The ``*.txt`` files under directory ``path`` in document order, and the other files
    (skipped); errors if there are no ``.txt`` files, naming what the directory holds."""
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; pass a directory of .txt files")
    every = sorted((p for p in path.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    files = [f for f in every if f.suffix == ".txt"]
    skipped = [f for f in every if f.suffix != ".txt"]
    if not files:
        held = f" (it holds {_listing(path, skipped)})" if skipped else ""
        raise DataError(f"{path}: no *.txt files in this directory{held}; a directory is read "
                        f"as one document per .txt file: add some, or pass a .jsonl file itself")
    return files, skipped


def _listing(root: Path, files: list[Path], limit: int = 5) -> str:
    names = [f.relative_to(root).as_posix() for f in files]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _warn_skipped(path: Path, skipped: list[Path]) -> None:
    if skipped:
        log.warning("%s: skipped %d file(s) that are not .txt: %s (a directory is read as one "
                    "document per .txt file; pass a .jsonl file itself, or rename text files "
                    "to .txt)", path, len(skipped), _listing(path, skipped))


def _dir_documents(path: Path, files: list[Path], format: Format = "auto") -> Iterator[Document]:
    for f in files:
        if format == "auto" and detect_format(f) == "jsonl":
            raise DataError(
                f"{f}: holds JSON Lines (its first line is a JSON object), but a directory is "
                f"read as one plain-text document per .txt file; pass the file itself, or "
                f"format='text' (data.format=text) to read it as text")
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
    raw = path.read_bytes()
    _check_not_binary(path, raw[:_SNIFF_BYTES])
    return _decode_utf8(path, raw).removeprefix(_BOM)


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
