"""Tokenizing documents into fixed-length rows for next-token prediction."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stride_jax.data._documents import DataError, Document
from stride_jax.tokenizer import SpecialIds, as_backend, special_ids

__all__ = ["TokenizedSet", "load_tokenized", "tokenize_documents", "tokenize_to_disk"]

Mode = Literal["chunk", "document"]


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    """Fixed-length token rows, right-padded, with the positions that are scored.

    With ``n`` rows of ``L = seq_len`` tokens:

    Attributes:
      ids: ``n`` row ids: the document id in ``"document"`` mode, ``f"{doc_id}:{k}"`` for the
        ``k``-th chunk in ``"chunk"`` mode.
      input_ids: int32 ``[n, L]``; padded positions hold the pad id (eos if there is no pad token).
      attention_mask: int32 ``[n, L]``; 1 on real tokens, 0 on padding (padding is on the right,
        so each row's real tokens are a prefix).
      loss_mask: int32 ``[n, L]``, indexed by the *predicting* position: ``loss_mask[i, t] = 1``
        iff ``t + 1 < L`` and token ``t + 1`` of row ``i`` is a real token of the completion
        (document text or appended eos; never a prompt, bos or pad token). The last column is
        therefore always 0. The summed next-token loss of row ``i`` is::

            sum_t loss_mask[i, t] * -log p(input_ids[i, t + 1] | input_ids[i, :t + 1])

        i.e. with ``logits`` of shape ``[n, L, V]`` use ``logits[:, :-1]``, targets
        ``input_ids[:, 1:]`` and weights ``loss_mask[:, :-1]``.
      source_ids: ``n`` ids of the document each row came from.
      targets: optional int32 ``[n, L]``: the id predicted at each position, for models whose
        targets are not the next input token (a classifier attributed in place, where a row is
        one example ``[[example_index]]`` with target ``[[label]]``). ``None`` (language models):
        ``targets[:, t] = input_ids[:, t + 1]``. See :meth:`target_ids`.
    """

    ids: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    source_ids: list[str]
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("input_ids", "attention_mask", "loss_mask"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[0] != n or a.shape != self.input_ids.shape:
                raise DataError(
                    f"TokenizedSet.{name} has shape {a.shape}; expected [{n}, seq_len] like input_ids"
                )
        if self.targets is not None and self.targets.shape != self.input_ids.shape:
            raise DataError(f"TokenizedSet.targets has shape {self.targets.shape}; expected "
                            f"{self.input_ids.shape} like input_ids")
        if len(self.source_ids) != n:
            raise DataError(f"TokenizedSet.source_ids has {len(self.source_ids)} entries; expected {n}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def target_ids(self) -> np.ndarray:
        """int32 ``[n, L]``: the id scored at each position (the next token unless ``targets``).

        For language models the last column wraps around to column 0; it is never scored.
        """
        if self.targets is not None:
            return self.targets
        return np.concatenate([self.input_ids[:, 1:], self.input_ids[:, :1]], axis=1)

    @property
    def num_targets(self) -> np.ndarray:
        """int64 ``[n]``: scored next-token targets per row (``loss_mask.sum(1)``)."""
        return self.loss_mask.sum(axis=1, dtype=np.int64)

    @classmethod
    def from_arrays(cls, input_ids: Any, attention_mask: Any = None, completion_mask: Any = None,
                    *, ids: Sequence[str] | None = None) -> TokenizedSet:
        """Rows from token arrays you already have; the next-token shift is applied here.

        Args:
          input_ids: int ``[n, L]`` token ids, one row per example (NumPy, JAX or lists).
          attention_mask: ``[n, L]``, 1 on real tokens and 0 on padding (padding on the right);
            default all ones.
          completion_mask: ``[n, L]``, 1 on the tokens whose prediction is scored (e.g. an
            answer after its prompt); default every real token. The first token of a row is
            never scored (nothing predicts it).
          ids: ``n`` row ids (default ``"0" .. "n-1"``).

        ``loss_mask[:, t] = attention_mask[:, t+1] * completion_mask[:, t+1]`` (the position that
        *predicts* token ``t + 1``; the last column is 0), as :class:`TokenizedSet` defines it.
        """
        x = np.asarray(input_ids)
        if x.ndim != 2 or x.shape[1] < 2 or not (x.size == 0 or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"input_ids must be an integer [rows, seq_len] array with seq_len >= 2 "
                            f"(one next-token target), got {x.dtype} of shape {x.shape}")
        if x.size and x.min() < 0:
            raise DataError(f"input_ids holds negative token ids ({int(x.min())}); pad with a "
                            f"real token id and mark the padding in attention_mask")
        masks = {}
        for name, m in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
            a = np.ones(x.shape, np.int32) if m is None else np.asarray(m)
            if a.shape != x.shape:
                raise DataError(f"{name} has shape {a.shape}; expected {x.shape} like input_ids")
            if a.size and not np.isin(a, (0, 1)).all():
                raise DataError(f"{name} must hold only 0 and 1")
            masks[name] = a.astype(np.int32)
        attention = masks["attention_mask"]
        loss = np.zeros(x.shape, np.int32)
        loss[:, :-1] = attention[:, 1:] * masks["completion_mask"][:, 1:]
        n = x.shape[0]
        names = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(names) != n:
            raise DataError(f"ids has {len(names)} entries for {n} rows")
        return cls(names, x.astype(np.int32), attention, loss, list(names))

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedSet:
        """Rows ``indices``, in that order (e.g. one split from :func:`split_ids`)."""
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedSet(
            ids=[self.ids[i] for i in idx],
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            loss_mask=self.loss_mask[idx],
            source_ids=[self.source_ids[i] for i in idx],
            targets=None if self.targets is None else self.targets[idx],
        )


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: Any,
    seq_len: int,
    *,
    mode: Mode,
    min_tokens: int | None = None,
    truncate: bool = False,
    add_eos: bool = True,
    add_bos: bool = False,
    specials: SpecialIds | None = None,
    too_long_fix: str | None = None,
) -> TokenizedSet:
    """Tokenize documents into rows of ``seq_len`` tokens (see :class:`TokenizedSet`).

    Each document becomes the token sequence ``[bos] + prompt + text + [eos]`` (bos only with
    ``add_bos``, eos with ``add_eos`` when the tokenizer has one). Prompt and text are encoded
    separately, without the tokenizer's own special tokens, so the prompt/completion boundary is a
    token boundary. Only text and eos tokens are scored.

    Modes:
      ``"chunk"``: each document's sequence is cut into consecutive, non-overlapping pieces of
        ``seq_len`` tokens with ids ``f"{doc_id}:{k}"`` (``k = 0, 1, ...``), so a chunk id depends
        only on its own document. The first token of a chunk has no context inside the row and is
        not a target. A final piece shorter than ``min_tokens`` (default ``seq_len // 4``) is
        dropped, otherwise padded; chunk 0 is always kept so every document has a row. A later
        chunk with no scored target (all prompt) is dropped. Meant for long texts (plays).
      ``"document"``: one row per document with id ``doc_id``. A sequence longer than ``seq_len``
        raises :class:`DataError`, or with ``truncate=True`` keeps its first ``seq_len`` tokens.

    ``tokenizer`` is a :class:`tokenizers.Tokenizer` or a transformers fast tokenizer; ``specials``
    overrides the special ids found by :func:`stride_jax.tokenizer.special_ids`; ``too_long_fix``
    replaces the advice given when a document does not fit (a CLI names its own options).
    :func:`tokenize_to_disk` gives the same rows for a training set larger than memory.
    """
    rows = _RowBuilder.create(
        tokenizer, seq_len, mode=mode, min_tokens=min_tokens, truncate=truncate, add_eos=add_eos,
        add_bos=add_bos, specials=specials, too_long_fix=too_long_fix)
    docs = list(docs)
    if not docs:
        raise DataError("no documents to tokenize; read some with read_documents first")
    _check_unique(docs, set())
    return rows.build(docs)


# The row arrays of a tokenized directory, each int32 [n, seq_len] in <name>.npy.
_ARRAYS = ("input_ids", "attention_mask", "loss_mask")
_OUTPUTS = (*(f"{name}.npy" for name in _ARRAYS), "ids.json")
_MARKER = "complete.json"


def tokenize_to_disk(
    docs: Iterable[Document],
    tokenizer: Any,
    seq_len: int,
    directory: str | os.PathLike[str],
    *,
    mode: Mode,
    chunk_docs: int = 2048,
    min_tokens: int | None = None,
    truncate: bool = False,
    add_eos: bool = True,
    add_bos: bool = False,
    specials: SpecialIds | None = None,
    too_long_fix: str | None = None,
    meta: Any = None,
) -> TokenizedSet:
    """Tokenize a stream of documents into memory-mapped files in ``directory``.

    The rows and ids are exactly those of :func:`tokenize_documents` on ``list(docs)`` with the
    same options, and so are the errors (of several problems, the first one streamed past is
    reported), but ``docs`` (any iterable, e.g. :func:`iter_documents`) is consumed
    ``chunk_docs`` documents at a time and each chunk's rows are appended to disk, so the
    training set need not fit in memory. Memory holds one chunk of documents and its rows
    (``O(chunk_docs * seq_len)`` tokens in ``"document"`` mode; a chunk's longest documents in
    ``"chunk"`` mode) plus the ``n`` row ids and the set of document ids seen (to refuse
    duplicates across chunks), never the ``[n, seq_len]`` arrays.

    ``directory`` receives ``input_ids.npy``, ``attention_mask.npy`` and ``loss_mask.npy`` (int32
    ``[n, seq_len]``), ``ids.json`` (``{"ids": [...], "source_ids": [...]}``) and, last,
    ``complete.json`` (``rows``, ``seq_len``, ``mode`` and the caller's ``meta``, any JSON value
    describing the inputs, e.g. the source file's size and mtime). Every file is written under a
    temporary name and renamed into place once whole. A call always rebuilds the directory and
    first removes ``complete.json``, so an interrupted call leaves a directory that
    :func:`load_tokenized` refuses and that the next call starts over.

    Returns the set with read-only memory-mapped arrays (as :func:`load_tokenized`).
    """
    from stride_jax.io.atomic import atomic_path
    if chunk_docs < 1:
        raise DataError(f"chunk_docs={chunk_docs}: need at least 1 document per chunk")
    rows = _RowBuilder.create(
        tokenizer, seq_len, mode=mode, min_tokens=min_tokens, truncate=truncate, add_eos=add_eos,
        add_bos=add_bos, specials=specials, too_long_fix=too_long_fix)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_outputs(directory)
    # n is unknown until the stream ends: each .npy file starts with the header of an empty
    # [0, seq_len] array, rows are appended after it, and the header is rewritten for the final
    # n. numpy pads a header so that its first axis can grow to 21 digits without changing the
    # header's length (np.lib.format.GROWTH_AXIS_MAX_DIGITS), hence the data never moves.
    empty = _npy_header((0, seq_len))
    seen: set[str] = set()
    ids: list[str] = []
    source_ids: list[str] = []
    with contextlib.ExitStack() as stack:
        # every_process: in a multi-host run each process tokenizes into a directory of its own.
        temps = [stack.enter_context(atomic_path(directory / f"{name}.npy", every_process=True))
                 for name in _ARRAYS]
        # Entered after atomic_path, so the files are closed before they are renamed.
        files = [stack.enter_context(open(tmp, "wb")) for tmp in temps]
        for f in files:
            f.write(empty)
        docs = iter(docs)
        while chunk := list(itertools.islice(docs, chunk_docs)):
            _check_unique(chunk, seen)
            part = rows.build(chunk)
            for f, name in zip(files, _ARRAYS):
                f.write(getattr(part, name))   # C-order int32 rows, as .npy stores them
            ids += part.ids
            source_ids += part.source_ids
        if not ids:
            raise DataError("no documents to tokenize; read some with read_documents first")
        header = _npy_header((len(ids), seq_len))
        if len(header) != len(empty):   # a numpy too old to pad (pyproject excludes it)
            raise RuntimeError("this numpy version does not pad .npy headers for growth; "
                               "upgrade numpy to stream tokenized rows to disk")
        for f in files:
            f.seek(0)
            f.write(header)
        with atomic_path(directory / "ids.json", every_process=True) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write('{"ids": ')
                _write_json_list(f, ids)
                f.write(', "source_ids": ')
                _write_json_list(f, source_ids)
                f.write("}")
    with atomic_path(directory / _MARKER, every_process=True) as tmp:
        tmp.write_text(json.dumps({"rows": len(ids), "seq_len": seq_len, "mode": mode,
                                   "meta": meta}) + "\n", encoding="utf-8")
    return _open_tokenized(directory, ids, source_ids, seq_len)


def load_tokenized(directory: str | os.PathLike[str], *, meta: Any = None) -> TokenizedSet:
    """The rows written by :func:`tokenize_to_disk` into ``directory``, memory-mapped read-only.

    Raises :class:`DataError` if the directory holds no complete set (missing, or the writing
    was interrupted before ``complete.json``), or, when ``meta`` is given, if the set was made
    with another ``meta`` (other inputs; compared after a JSON round trip).
    """
    directory = Path(directory)
    marker = directory / _MARKER
    if not marker.is_file():
        raise DataError(
            f"{directory}: no complete tokenized rows here ({_MARKER} is missing: they were never "
            f"written, or the writing was interrupted); build them with tokenize_to_disk")
    info = json.loads(marker.read_text(encoding="utf-8"))
    if meta is not None and info.get("meta") != json.loads(json.dumps(meta)):
        raise DataError(f"{directory}: the rows were tokenized from other inputs (recorded "
                        f"{info.get('meta')!r}, expected {meta!r}); tokenize them again")
    listed = json.loads((directory / "ids.json").read_text(encoding="utf-8"))
    ts = _open_tokenized(directory, listed["ids"], listed["source_ids"], info["seq_len"])
    if len(ts) != info["rows"]:
        raise DataError(f"{directory}: {len(ts)} rows on disk but {_MARKER} records "
                        f"{info['rows']}; the directory is corrupt, tokenize again")
    return ts


def _open_tokenized(directory: Path, ids: list[str], source_ids: list[str],
                    seq_len: int) -> TokenizedSet:
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
              for name in _ARRAYS}
    try:
        ts = TokenizedSet(ids=ids, source_ids=source_ids, **arrays)
    except ValueError as e:
        raise DataError(f"{directory}: inconsistent tokenized files ({e}); tokenize "
                        f"again") from None
    if ts.seq_len != seq_len:
        raise DataError(f"{directory}: rows of {ts.seq_len} tokens but {_MARKER} records "
                        f"seq_len={seq_len}; the directory is corrupt, tokenize again")
    return ts


def _remove_outputs(directory: Path) -> None:
    """Forget a previous build in ``directory``: its marker first, then its files and the
    temporary files of a build that was killed."""
    (directory / _MARKER).unlink(missing_ok=True)
    for name in _OUTPUTS:
        (directory / name).unlink(missing_ok=True)
        for tmp in directory.glob(f".{name}.*.tmp"):   # atomic_path's temporary names
            tmp.unlink(missing_ok=True)


def _write_json_list(f: Any, items: list[str], block: int = 8192) -> None:
    """Write ``items`` to text file ``f`` as one JSON list, encoding ``block`` items at a time
    (encoded whole, millions of ids would make one more string as large as the list)."""
    f.write("[")
    for start in range(0, len(items), block):
        if start:
            f.write(", ")
        f.write(json.dumps(items[start : start + block], ensure_ascii=False)[1:-1])
    f.write("]")


def _npy_header(shape: tuple[int, int]) -> bytes:
    """The .npy (version 1.0) header of a C-order int32 array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False,
        "shape": shape})
    return buf.getvalue()


def _check_unique(docs: Sequence[Document], seen: set[str]) -> None:
    """Refuse a document whose id is in ``seen`` (earlier chunks) or repeated; adds the ids."""
    for d in docs:
        if d.id in seen:
            raise DataError(f"duplicate document id {d.id!r}; ids must be unique (rename one)")
        seen.add(d.id)


@dataclasses.dataclass(frozen=True)
class _RowBuilder:
    """The validated options of one tokenization; :meth:`build` turns documents into rows.

    Rows depend only on their own document, so building a list of documents at once or in
    consecutive chunks gives the same rows in the same order.
    """

    backend: Any
    seq_len: int
    mode: Mode
    min_tokens: int
    truncate: bool
    head: list[int]
    tail: list[int]
    filler_id: int
    too_long_fix: str | None

    @classmethod
    def create(cls, tokenizer: Any, seq_len: int, *, mode: Mode, min_tokens: int | None,
               truncate: bool, add_eos: bool, add_bos: bool, specials: SpecialIds | None,
               too_long_fix: str | None) -> _RowBuilder:
        if mode not in ("chunk", "document"):
            raise DataError(f'mode must be "chunk" or "document", got {mode!r}')
        if seq_len < 2:
            raise DataError(f"seq_len={seq_len}: need at least 2 tokens for one next-token target")
        if min_tokens is None:
            min_tokens = max(seq_len // 4, 2)
        if not 1 <= min_tokens <= seq_len:
            raise DataError(f"min_tokens={min_tokens} must lie in [1, seq_len={seq_len}]")
        backend = as_backend(tokenizer)
        sp = specials if specials is not None else special_ids(tokenizer)
        if add_bos and sp.bos_id is None:
            raise DataError("add_bos=True but the tokenizer has no bos token")
        return cls(backend=backend, seq_len=seq_len, mode=mode, min_tokens=min_tokens,
                   truncate=truncate, head=[sp.bos_id] if add_bos else [],
                   tail=[sp.eos_id] if add_eos and sp.eos_id is not None else [],
                   filler_id=sp.filler_id, too_long_fix=too_long_fix)

    def build(self, docs: Sequence[Document]) -> TokenizedSet:
        """The rows of ``docs`` (ids assumed unique), in document order."""
        seq_len = self.seq_len
        texts = [d.text for d in docs]
        prompted = [i for i, d in enumerate(docs) if d.prompt is not None]
        text_ids = _encode(self.backend, texts)
        prompt_ids = dict(zip(prompted, _encode(self.backend, [docs[i].prompt for i in prompted])))

        rows: list[tuple[str, str, list[int], np.ndarray]] = []  # (row id, doc id, tokens, scored)
        for i, doc in enumerate(docs):
            context = self.head + prompt_ids.get(i, [])
            tokens = context + text_ids[i] + self.tail
            # scored[j]: token j is a completion token, i.e. a target worth predicting.
            scored = np.zeros(len(tokens), dtype=bool)
            scored[len(context):] = True
            if self.mode == "document":
                if len(tokens) > seq_len:
                    if not self.truncate:
                        fix = self.too_long_fix or (
                            'use mode="chunk", a model with a larger context (seq_len), or '
                            "truncate=True to cut it")
                        raise DataError(
                            f"document {doc.id!r} has {len(tokens)} tokens but seq_len is "
                            f"{seq_len}; {fix}"
                        )
                    tokens, scored = tokens[:seq_len], scored[:seq_len]
                if not scored[1:].any():
                    raise DataError(
                        f"document {doc.id!r}: its prompt fills all {seq_len} positions, so no "
                        f"completion token is scored; shorten the prompt or raise seq_len"
                    )
                rows.append((doc.id, doc.id, tokens, scored))
            else:
                for k, start in enumerate(range(0, len(tokens), seq_len)):
                    piece = tokens[start : start + seq_len]
                    piece_scored = scored[start : start + seq_len]
                    if k > 0 and (len(piece) < self.min_tokens or not piece_scored[1:].any()):
                        continue
                    rows.append((f"{doc.id}:{k}", doc.id, piece, piece_scored))

        n = len(rows)
        input_ids = np.full((n, seq_len), self.filler_id, dtype=np.int32)
        attention_mask = np.zeros((n, seq_len), dtype=np.int32)
        loss_mask = np.zeros((n, seq_len), dtype=np.int32)
        for r, (_, _, tokens, scored) in enumerate(rows):
            m = len(tokens)
            input_ids[r, :m] = tokens
            attention_mask[r, :m] = 1
            loss_mask[r, : m - 1] = scored[1:m]
        return TokenizedSet(
            ids=[r[0] for r in rows],
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            source_ids=[r[1] for r in rows],
        )


def _encode(backend: Any, texts: list[str | None]) -> list[list[int]]:
    if not texts:
        return []
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
