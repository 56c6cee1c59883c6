"""Byte-level BPE tokenizers: training, saving in the Hugging Face layout, loading, special ids.

Everything here works on :class:`tokenizers.Tokenizer` (the Rust "fast" tokenizer). A directory
written by :func:`save_tokenizer` also loads with ``transformers.AutoTokenizer.from_pretrained``
(as a ``PreTrainedTokenizerFast``) and encodes identically, so a model trained here can be shipped
with its tokenizer in the usual HF layout.

Special-token conventions (GPT-2 style): ``<|endoftext|>`` is both end- and beginning-of-sequence,
``<|pad|>`` is padding. Padding is never scored (see :mod:`stride_jax.data`), so when a tokenizer has
no pad token the eos id is used as filler.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from stride_jax.errors import ConfigError, DataError, ModelError

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "RowTexts",
    "SpecialIds",
    "as_backend",
    "check_model_tokenizer",
    "check_vocab_matches",
    "load_tokenizer",
    "row_texts",
    "save_tokenizer",
    "special_ids",
    "tokenizer_fingerprint",
    "train_bpe",
    "vocab_size_of",
]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"
# Written next to a model by stride-jax (to_hf): the fingerprint of the tokenizer it was trained
# with, so a model directory without its tokenizer.json can still tell a foreign one.
MODEL_STAMP_FILE = "stride_jax.json"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (EOS_TOKEN, PAD_TOKEN),
    min_frequency: int = 2,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    The vocabulary is ``special_tokens`` (ids ``0 .. len(special_tokens) - 1``, in order), then the
    256 byte symbols, then merges learned greedily by pair frequency until ``vocab_size`` entries
    exist (fewer if the corpus runs out of pairs seen ``min_frequency`` times). Because every byte
    is in the alphabet, any string encodes without an unknown token and decodes back exactly.

    Pre-tokenization is ``ByteLevel(add_prefix_space=False)`` (GPT-2's regex split; a leading space
    belongs to the following word), decoding is ``ByteLevel``. Training is deterministic: the same
    ``texts`` give the same vocabulary and merges.
    """
    special_tokens = list(special_tokens)
    minimum = 256 + len(special_tokens)
    if vocab_size <= minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} leaves no room for merges: byte-level BPE needs 256 byte "
            f"symbols plus {len(special_tokens)} special tokens; pass vocab_size > {minimum}"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets pointing at the raw text (spaces included), as GPT-2 does.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(
    tok: tokenizers.Tokenizer,
    directory: str | os.PathLike[str],
    *,
    model_max_length: int | None = None,
) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The two JSON configs are the minimum ``transformers.AutoTokenizer.from_pretrained`` needs to
    build a ``PreTrainedTokenizerFast`` around ``tokenizer.json`` with eos/bos = ``<|endoftext|>``
    and pad = ``<|pad|>`` (each only when the token is in the vocabulary). Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / TOKENIZER_FILE))
    specials: dict[str, str] = {}
    if tok.token_to_id(EOS_TOKEN) is not None:
        specials["bos_token"] = EOS_TOKEN
        specials["eos_token"] = EOS_TOKEN
    if tok.token_to_id(PAD_TOKEN) is not None:
        specials["pad_token"] = PAD_TOKEN
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", specials)
    return directory


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a directory containing one."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {file}: expected a `{TOKENIZER_FILE}` file (as written by "
            f"stride_jax.tokenizer.save_tokenizer or transformers' save_pretrained), or a "
            f"directory containing one"
        )
    try:
        with open(file, "rb") as f:
            bom = f.read(3) == b"\xef\xbb\xbf"
        if bom:   # a byte order mark (an editor's): the JSON after it is fine
            return tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8-sig"))
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
        raise DataError(
            f"{file} is not a readable tokenizer ({e}); the file is corrupt or from an "
            f"unsupported tokenizers version: re-save it with the model (save_tokenizer or "
            f"transformers' save_pretrained)"
        ) from None


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens a tokenizer has; ``None`` where it has none."""

    eos_id: int | None
    pad_id: int | None
    bos_id: int | None

    @property
    def filler_id(self) -> int:
        """Id written into padded positions: pad, else eos, else 0 (never scored either way)."""
        for i in (self.pad_id, self.eos_id):
            if i is not None:
                return i
        return 0


def as_backend(tok: Any) -> tokenizers.Tokenizer:
    """The :class:`tokenizers.Tokenizer` behind ``tok`` (itself, or a transformers fast tokenizer's)."""
    if isinstance(tok, tokenizers.Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    raise TypeError(
        f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got {type(tok).__name__}"
    )


def special_ids(
    tok: Any,
    *,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
    bos_token: str | None = None,
) -> SpecialIds:
    """Special ids of ``tok``.

    For a transformers tokenizer the ids it declares are used. For a bare
    :class:`tokenizers.Tokenizer` (which carries no such roles) they are looked up by name:
    ``eos_token``, ``pad_token`` and ``bos_token`` (default: the eos token, GPT-2 style).
    """
    if not isinstance(tok, tokenizers.Tokenizer) and hasattr(tok, "eos_token_id"):
        return SpecialIds(
            eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id
        )
    backend = as_backend(tok)
    return SpecialIds(
        eos_id=backend.token_to_id(eos_token),
        pad_id=backend.token_to_id(pad_token),
        bos_id=backend.token_to_id(bos_token if bos_token is not None else eos_token),
    )


def vocab_size_of(tok: Any) -> int:
    """Number of ids the tokenizer can emit: ``max id + 1`` over the vocabulary and added tokens."""
    vocab = as_backend(tok).get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def check_vocab_matches(tok: Any, vocab_size: int) -> None:
    """Raise ``ValueError`` if ``tok`` can emit ids outside a model embedding of ``vocab_size`` rows.

    A model may have *more* rows than the tokenizer has tokens (embeddings are often padded to a
    multiple of 64); only the reverse is an error, since those ids would index past the table.
    """
    n = vocab_size_of(tok)
    if n > vocab_size:
        raise ModelError(
            f"tokenizer has {n} tokens but the model's embedding has {vocab_size} rows; pass the "
            f"tokenizer saved with the model (its tokenizer.json), not one trained or downloaded "
            f"separately"
        )


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 (16 hex digits) of what decides the ids: the tokenizer's serialisation (model,
    vocabulary, merges, added tokens, normaliser, pre-tokeniser), padding/truncation excluded."""
    data = json.loads(as_backend(tok).to_str())
    data.pop("padding", None)
    data.pop("truncation", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _model_tokenizer(model_dir: Path) -> tuple[str | None, str | None, Any]:
    """(fingerprint, where it comes from, the tokenizer if its file is there) of the tokenizer
    saved with the model in ``model_dir``; (None, None, None) when the directory has neither."""
    own = model_dir / TOKENIZER_FILE
    if own.is_file():
        tok = load_tokenizer(own)
        return tokenizer_fingerprint(tok), str(own), tok
    try:
        stamp = json.loads((model_dir / MODEL_STAMP_FILE).read_text(encoding="utf-8-sig"))
        return str(stamp["tokenizer_fingerprint"]), str(model_dir / MODEL_STAMP_FILE), None
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, None


def check_model_tokenizer(tok: Any, model_dir: str | os.PathLike[str], *, source: str,
                          force: bool = False) -> None:
    """Refuse a tokenizer that is not the one the model in ``model_dir`` was trained with.

    A model only understands the ids of its own tokenizer: another one of the same (or a
    smaller) vocabulary size runs without error and gives wrong losses and scores. ``tok`` is
    compared with the model directory's ``tokenizer.json``, or else with the fingerprint
    stride-jax stored with the model (``stride_jax.json``); a mismatch raises :class:`ModelError`
    naming both (``source`` is where ``tok`` came from), unless ``force`` (then a warning). A
    model directory with neither cannot be checked (a warning says so).
    """
    model_dir = Path(model_dir)
    theirs, where, their_tok = _model_tokenizer(model_dir)
    if theirs is None:
        log.warning("cannot check that the tokenizer %s belongs to the model: %s has no %s; the "
                    "base loss on the queries is the only check left", source, model_dir,
                    TOKENIZER_FILE)
        return
    if tokenizer_fingerprint(tok) == theirs:
        return
    detail = ""
    if their_tok is not None:
        a = as_backend(tok).get_vocab(with_added_tokens=True)
        b = as_backend(their_tok).get_vocab(with_added_tokens=True)
        differ = sum(1 for t, i in a.items() if b.get(t) != i)
        detail = (f": {differ} of its {len(a)} tokens have another id or none in the model's "
                  f"{len(b)}" if differ else ": same vocabulary, other rules (merges, "
                  "normalisation or pre-tokenisation)")
    msg = f"the tokenizer {source} is not the one the model was trained with ({where}){detail}"
    if force:
        log.warning("%s; using it anyway (--force-tokenizer)", msg)
        return
    raise ModelError(f"{msg}; a model only understands the ids of its own tokenizer: omit "
                     f"--tokenizer to use the model's, or pass --force-tokenizer if you know "
                     f"the two encode alike")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class RowTexts:
    """The decoded text of each row's real tokens, a read-only sequence decoded on access.

    Outputs name a few rows per query (topk.jsonl, the printout), so a training set of ``n``
    rows, possibly memory-mapped and larger than memory, is never decoded whole. Supports
    ``len``, indexing (negative too), slicing (a list) and iteration.
    """

    def __init__(self, rows, tokenizer) -> None:
        self._rows = rows
        self._backend = as_backend(tokenizer)

    def __len__(self) -> int:
        return len(self._rows.input_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        ids, mask = self._rows.input_ids[j], self._rows.attention_mask[j]
        return self._backend.decode([int(t) for t, m in zip(ids, mask) if m])

    def __iter__(self):
        return (self[j] for j in range(len(self)))


def row_texts(rows, tokenizer) -> RowTexts:
    """Decoded text of each row's real tokens (decoded lazily, see :class:`RowTexts`)."""
    return RowTexts(rows, tokenizer)
