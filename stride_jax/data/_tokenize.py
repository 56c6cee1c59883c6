"""Tokenizing documents into fixed-length rows for next-token prediction."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from stride_jax.data._documents import DataError, Document
from stride_jax.tokenizer import SpecialIds, as_backend, special_ids

__all__ = ["TokenizedSet", "tokenize_documents"]

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
                raise ValueError(
                    f"TokenizedSet.{name} has shape {a.shape}; expected [{n}, seq_len] like input_ids"
                )
        if self.targets is not None and self.targets.shape != self.input_ids.shape:
            raise ValueError(f"TokenizedSet.targets has shape {self.targets.shape}; expected "
                             f"{self.input_ids.shape} like input_ids")
        if len(self.source_ids) != n:
            raise ValueError(f"TokenizedSet.source_ids has {len(self.source_ids)} entries; expected {n}")

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
    """
    if mode not in ("chunk", "document"):
        raise ValueError(f'mode must be "chunk" or "document", got {mode!r}')
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need at least 2 tokens for one next-token target")
    if min_tokens is None:
        min_tokens = max(seq_len // 4, 2)
    if not 1 <= min_tokens <= seq_len:
        raise ValueError(f"min_tokens={min_tokens} must lie in [1, seq_len={seq_len}]")
    docs = list(docs)
    if not docs:
        raise DataError("no documents to tokenize; read some with read_documents first")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise DataError(f"duplicate document id {d.id!r}; ids must be unique (rename one)")
        seen.add(d.id)

    backend = as_backend(tokenizer)
    sp = specials if specials is not None else special_ids(tokenizer)
    if add_bos and sp.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos token")
    head = [sp.bos_id] if add_bos else []
    tail = [sp.eos_id] if add_eos and sp.eos_id is not None else []

    texts = [d.text for d in docs]
    prompted = [i for i, d in enumerate(docs) if d.prompt is not None]
    text_ids = _encode(backend, texts)
    prompt_ids = dict(zip(prompted, _encode(backend, [docs[i].prompt for i in prompted])))

    rows: list[tuple[str, str, list[int], np.ndarray]] = []  # (row id, doc id, tokens, scored)
    for i, doc in enumerate(docs):
        context = head + prompt_ids.get(i, [])
        tokens = context + text_ids[i] + tail
        # scored[j]: token j is a completion token, i.e. a target worth predicting.
        scored = np.zeros(len(tokens), dtype=bool)
        scored[len(context):] = True
        if mode == "document":
            if len(tokens) > seq_len:
                if not truncate:
                    fix = too_long_fix or (
                        'use mode="chunk", a model with a larger context (seq_len), or '
                        "truncate=True to cut it")
                    raise DataError(
                        f"document {doc.id!r} has {len(tokens)} tokens but seq_len is {seq_len}; "
                        f"{fix}"
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
                if k > 0 and (len(piece) < min_tokens or not piece_scored[1:].any()):
                    continue
                rows.append((f"{doc.id}:{k}", doc.id, piece, piece_scored))

    n = len(rows)
    input_ids = np.full((n, seq_len), sp.filler_id, dtype=np.int32)
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
