"""``stride-jax report RUN_DIR``: one self-contained static HTML page per attribution run.

Why one static file: runs are made on remote or headless machines, and the people reading them
use a laptop or a phone. A single ``.html`` with inline CSS and inline SVG can be copied anywhere
(scp, a CI artifact, a chat attachment) and opened offline with no server, no JavaScript and no
network; it references no URL at all. That rules out plotting libraries, so the three plots are
drawn here as SVG by small pure functions (:func:`svg_histogram`, :func:`svg_scatter_logx`).

Everything taken from the run (ids, training and query texts, decoded tokens) is untrusted: a
training corpus can hold ``<script>``, so every such string goes through :func:`_esc`
(``html.escape`` after replacing control characters and lone surrogates, which are invalid in
HTML or unencodable in UTF-8). Sizes are bounded (text snippets, capped full texts, capped token
rows, ``max_queries``) so that a large run still gives a page a phone can open.

Inputs, all in ``RUN_DIR`` as written by :meth:`stride_jax.attribution.Attribution.write`:
``topk.jsonl`` (required), ``scores.npy``, ``ids.json``, ``attribute.yaml``, and optionally
``tokens.json`` (per-token effects, :mod:`stride_jax.apps.tokens`), ``selfinf.json``
(self-influence) and ``run_info.json`` (the model's identity, the method, each stage's wall
time and the operator-training loss curve). LDS benchmark results
(``benchmarks/results/lds.json``) may be passed too.

Structure: :func:`load_run` and :func:`load_lds_results` read and validate (every error is one
line naming the file and the fix); :func:`render_report` is a pure function of what they return;
:func:`write_report` ties them together.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax.attribution import (IDS, SCORES, WEAK_SIGNAL_R2, Attribution, read_ids,
                                   read_run_info)
from stride_jax.errors import ConfigError, DataError

__all__ = [
    "LdsPoint",
    "RunData",
    "histogram_counts",
    "load_lds_results",
    "load_run",
    "render_report",
    "model_summary",
    "svg_histogram",
    "svg_line",
    "svg_scatter_logx",
    "write_report",
]

SNIPPET_CHARS = 120        # table cell text before "expand"
FULL_TEXT_CHARS = 4000     # the expanded text; training rows are a few hundred tokens anyway
QUERY_TEXT_CHARS = 4000
TOKENS_PER_ROW = 512       # per-token rows: tokens shown per query
TOKEN_ROWS = 40            # per-token rows: examples shown per query
SELFINF_TOP = 10
LEVELS = 8                 # colour steps of the per-token scales (CSS classes p1..p8, n1..n8)

_RERUN = "rerun `stride-jax attribute` (or `stride-jax demo`) to rewrite it"


# ------------------------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True)
class RunData:
    """What the report shows of one run; ``None`` marks an optional file that is absent.

    ``records`` are the (possibly capped) ``topk.jsonl`` lines in order; ``num_queries`` counts
    them all. ``tokens`` maps a query id to its ``tokens.json`` entry; ``selfinf`` is
    ``(ids, scores)``.
    """

    run_dir: Path
    records: list[dict]
    num_queries: int
    ids: dict | None = None
    scores: np.ndarray | None = None
    config: dict | None = None
    config_text: str | None = None
    tokens: dict[str, dict] | None = None
    selfinf: tuple[list[str], np.ndarray] | None = None
    info: dict | None = None


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); {fix}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                        f"{e.colno}); {fix}") from None


def _check_entry(path: Path, lineno: int, side: str, e: Any) -> None:
    if not isinstance(e, dict) or "id" not in e or "score" not in e:
        raise DataError(f"{path} line {lineno}: each of '{side}' must be an object with 'id' and "
                        f"'score' (got {str(e)[:60]!r}); {_RERUN}")
    if not isinstance(e["score"], (int, float)) or isinstance(e["score"], bool):
        raise DataError(f"{path} line {lineno}: a score in '{side}' is not a number "
                        f"({e['score']!r}); {_RERUN}")


def read_topk(path: Path) -> list[dict]:
    """The records of ``topk.jsonl``, validated so that rendering cannot fail half-way."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); {_RERUN}") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}, column {e.colno});"
                            f" fix or delete that line, or {_RERUN}") from None
        if not isinstance(rec, dict) or "query_id" not in rec:
            raise DataError(f"{path} line {lineno} is not a query record (an object with "
                            f"'query_id', 'proponents' and 'opponents'); {_RERUN}")
        for side in ("proponents", "opponents"):
            entries = rec.get(side, [])
            if not isinstance(entries, list):
                raise DataError(f"{path} line {lineno}: '{side}' must be a list; {_RERUN}")
            for e in entries:
                _check_entry(path, lineno, side, e)
        records.append(rec)
    if not records:
        raise DataError(f"{path} holds no query records; {_RERUN}")
    return records


def _read_tokens(path: Path) -> dict[str, dict]:
    fix = "delete it (the report then omits per-token highlights) or " + _RERUN
    obj = _read_json(path, fix)
    if not isinstance(obj, dict) or not isinstance(obj.get("queries"), list):
        raise DataError(f"{path} must be an object with a 'queries' list; {fix}")
    out: dict[str, dict] = {}
    for j, q in enumerate(obj["queries"]):
        where = f"{path} query #{j}"
        if not isinstance(q, dict) or "query_id" not in q or not isinstance(q.get("tokens"), list):
            raise DataError(f"{where} needs 'query_id' and a 'tokens' list; {fix}")
        T = len(q["tokens"])
        where = f"{path} query {q['query_id']!r}"
        lp = q.get("base_logprob")
        if lp is not None and (not isinstance(lp, list) or len(lp) != T):
            raise DataError(f"{where}: 'base_logprob' must list one number per token ({T}); {fix}")
        examples = q.get("examples", [])
        if not isinstance(examples, list):
            raise DataError(f"{where}: 'examples' must be a list; {fix}")
        for ex in examples:
            if (not isinstance(ex, dict) or "id" not in ex or not isinstance(ex.get("effect"), list)
                    or len(ex["effect"]) != T):
                raise DataError(f"{where}: each example needs an 'id' and an 'effect' list of "
                                f"one number per token ({T}); {fix}")
        out[str(q["query_id"])] = q
    return out


def _read_selfinf(path: Path) -> tuple[list[str], np.ndarray]:
    fix = "delete it (the report then omits self-influence) or rewrite it"
    obj = _read_json(path, fix)
    if (not isinstance(obj, dict) or not isinstance(obj.get("ids"), list)
            or not isinstance(obj.get("score"), list) or len(obj["ids"]) != len(obj["score"])):
        raise DataError(f"{path} must be {{\"ids\": [...], \"score\": [...]}} with one score per "
                        f"id; {fix}")
    try:
        score = np.asarray(obj["score"], np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'score' must hold numbers; {fix}") from None
    return [str(i) for i in obj["ids"]], score


def load_run(run_dir: str | Path, *, max_queries: int | None = None) -> RunData:
    """Read and validate a run directory; optional files that are absent become ``None``."""
    run = Path(run_dir)
    hint = ("pass the --out directory of `stride-jax attribute` (for the demo: "
            "runs/demo/attribution)")
    if not run.exists():
        raise FileNotFoundError(f"no run directory {run}; {hint}")
    if not run.is_dir():
        raise DataError(f"{run} is a file, not a run directory; {hint}")
    topk = run / "topk.jsonl"
    if not topk.is_file():
        raise FileNotFoundError(f"{run} has no topk.jsonl, so it is not a finished attribution "
                                f"run; {hint}, or finish this run with `stride-jax attribute`")
    if max_queries is not None and max_queries < 1:
        raise ConfigError(f"max_queries must be at least 1 (got {max_queries}); omit it to show "
                          f"every query")
    records = read_topk(topk)
    ids = scores = None
    if (run / SCORES).is_file():   # ids.json beside it is read and checked against it
        res = Attribution.load(run / SCORES, mmap=True, hint=_RERUN)
        scores = res.scores_qn
        if res.query_ids is not None:
            ids = {"queries": res.query_ids, "train": res.train_ids}
    elif (run / IDS).is_file():
        query_ids, train_ids = read_ids(run / IDS, hint=_RERUN)
        ids = {"queries": query_ids, "train": train_ids}
    config = config_text = None
    if (run / "attribute.yaml").is_file():
        import yaml
        config_text = (run / "attribute.yaml").read_text(encoding="utf-8", errors="replace")
        try:
            config = yaml.safe_load(config_text)
        except yaml.YAMLError as e:
            first = " ".join(str(e).split())[:120]
            raise DataError(f"{run / 'attribute.yaml'} is not valid YAML ({first}); "
                            f"{_RERUN}") from None
        if not isinstance(config, dict):
            config = None
    tokens = _read_tokens(run / "tokens.json") if (run / "tokens.json").is_file() else None
    selfinf = _read_selfinf(run / "selfinf.json") if (run / "selfinf.json").is_file() else None
    shown = records if max_queries is None else records[:max_queries]
    return RunData(run_dir=run, records=shown, num_queries=len(records), ids=ids, scores=scores,
                   config=config, config_text=config_text, tokens=tokens, selfinf=selfinf,
                   info=read_run_info(run))


@dataclasses.dataclass(frozen=True)
class LdsPoint:
    """One method on one task: LDS (mean over queries, with its CI when known) and wall time."""

    method: str
    seconds: float
    lds: float
    ci_low: float | None = None
    ci_high: float | None = None


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    return float(x) if math.isfinite(x) else None


def parse_lds_results(obj: Any, source: str = "the LDS results") -> tuple[dict[str, list[LdsPoint]],
                                                                         dict[str, str]]:
    """``({task: [LdsPoint]}, {task: caption})`` from ``benchmarks/lds.py``'s JSON.

    Accepted: ``{"tasks": {task: {"rows": [{"method", "lds": {"mean", "ci_low", "ci_high"} or a
    number, "seconds"}]}}}`` (``benchmarks/results/lds.json``) or one task's ``{"rows": [...]}``.
    Rows without a positive time or a finite LDS are left out (a log axis cannot show them).
    """
    shape = ('{"tasks": {TASK: {"rows": [{"method", "lds", "seconds"}, ...]}}} as written by '
             'benchmarks/lds.py (see benchmarks/results/lds.json)')
    if isinstance(obj, dict) and isinstance(obj.get("rows"), list):
        obj = {"tasks": {"results": obj}}
    if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), dict) or not obj["tasks"]:
        raise DataError(f"{source} is not LDS benchmark results; expected {shape}")
    tasks: dict[str, list[LdsPoint]] = {}
    captions: dict[str, str] = {}
    for task, body in obj["tasks"].items():
        if not isinstance(body, dict) or not isinstance(body.get("rows"), list):
            raise DataError(f"{source}: task {task!r} has no 'rows' list; expected {shape}")
        points = []
        for row in body["rows"]:
            if not isinstance(row, dict) or "method" not in row:
                raise DataError(f"{source}: a row of task {task!r} has no 'method'; "
                                f"expected {shape}")
            lds = row.get("lds")
            mean = _num(lds.get("mean")) if isinstance(lds, dict) else _num(lds)
            secs = _num(row.get("seconds"))
            if mean is None or secs is None or secs <= 0:
                continue
            lo = _num(lds.get("ci_low")) if isinstance(lds, dict) else None
            hi = _num(lds.get("ci_high")) if isinstance(lds, dict) else None
            points.append(LdsPoint(str(row["method"]), secs, mean, lo, hi))
        tasks[str(task)] = points
        bits = [f"{body['n']} training examples" if _num(body.get("n")) else "",
                f"{body['queries']} queries" if _num(body.get("queries")) else "",
                f"{body['groundtruth_subsets']} retrained subsets"
                if _num(body.get("groundtruth_subsets")) else ""]
        captions[str(task)] = ", ".join(b for b in bits if b)
    if isinstance(obj.get("device"), str):
        captions["_device"] = obj["device"]
    return tasks, captions


def load_lds_results(source: str | Path | Mapping) -> tuple[dict[str, list[LdsPoint]],
                                                            dict[str, str]]:
    """:func:`parse_lds_results` of a JSON file (or of an already parsed mapping)."""
    if isinstance(source, Mapping):
        return parse_lds_results(dict(source))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no LDS results file {path}; pass the JSON written by "
                                f"benchmarks/lds.py (e.g. benchmarks/results/lds.json)")
    return parse_lds_results(_read_json(path, "pass the JSON written by benchmarks/lds.py"),
                             str(path))


# ------------------------------------------------------------------------------ text helpers

_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _esc(x: Any) -> str:
    """Escaped text for element content and quoted attribute values."""
    return html.escape(_BAD_CHARS.sub("\ufffd", str(x)), quote=True)


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _text_cell(text: Any, snippet: int = SNIPPET_CHARS, full: int = FULL_TEXT_CHARS,
               missing: str = "(text not stored)") -> str:
    """A one-line snippet, expandable (``<details>``, no JavaScript) to the capped full text."""
    if text is None:
        return f'<span class="muted">{_esc(missing)}</span>'
    flat = _flat(text)
    if len(flat) <= snippet and "\n" not in str(text).strip():
        return _esc(flat)
    return (f"<details><summary>{_esc(flat[:snippet - 1])}…</summary>"
            f'<div class="full">{_esc(_cap(str(text), full))}</div></details>')


def _g(x: Any, spec: str = ".3g") -> str:
    v = _num(x)
    return "–" if v is None else format(v, spec).replace("-", "−")


def _count_label(c: int) -> str:
    return f"{c:,}" if c < 10_000 else f"1e{round(math.log10(c))}"


# ------------------------------------------------------------------------------------- plots


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) within ``[lo, hi]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(k0, k1 + 1)]


def _tick_label(t: float) -> str:
    return "0" if abs(t) < 1e-300 else format(t, ".3g").replace("-", "−")


def histogram_counts(chunks: Iterable[np.ndarray], *, bins: int = 41,
                     symmetric: bool = False) -> dict | None:
    """Bin edges, counts and summary statistics of the finite values of ``chunks``.

    Two passes over the chunks (range, then counts) so a large ``scores.npy`` opened with
    ``mmap_mode`` is never held in memory at once; ``chunks`` must therefore be re-iterable
    (a list or a tuple). With ``symmetric`` the range is ``[-m, m]`` with an odd bin count, so
    one bin is centred on 0 (where sparse Lasso scores pile up). ``None`` when nothing is finite.
    """
    lo, hi, n, zeros, pos, neg = math.inf, -math.inf, 0, 0, 0, 0
    for c in chunks:
        v = np.asarray(c, np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
            n += v.size
            zeros += int((v == 0).sum())
            pos += int((v > 0).sum())
            neg += int((v < 0).sum())
    if n == 0:
        return None
    if symmetric:
        m = max(abs(lo), abs(hi))
        r_lo, r_hi = -m, m
        bins += 1 - bins % 2
    else:
        r_lo, r_hi = lo, hi
    if not r_hi > r_lo:
        pad = abs(r_lo) * 0.1 or 1.0
        r_lo, r_hi = r_lo - pad, r_hi + pad
    counts = np.zeros(bins, np.int64)
    for c in chunks:
        v = np.asarray(c, np.float64).ravel()
        counts += np.histogram(v[np.isfinite(v)], bins=bins, range=(r_lo, r_hi))[0]
    return {"edges": np.linspace(r_lo, r_hi, bins + 1), "counts": counts, "n": n, "zeros": zeros,
            "positive": pos, "negative": neg, "min": lo, "max": hi, "symmetric": symmetric}


def svg_histogram(hist: Mapping, *, title: str, xlabel: str, width: int = 480,
                  height: int = 210) -> str:
    """An inline-SVG histogram with a log-count axis (``log10(1 + count)``).

    The log axis keeps a few large or small scores visible beside the thousands of (near-)zero
    ones a sparse solve produces. With ``hist["symmetric"]`` the bars are coloured by sign (the
    page's proponent and opponent colours) and 0 is marked. Every bar has a ``<title>`` tooltip.
    """
    edges, counts = np.asarray(hist["edges"], float), np.asarray(hist["counts"], np.int64)
    L, R, T, B = 52, 14, 12, 42
    pw, ph = width - L - R, height - T - B
    lo, hi = float(edges[0]), float(edges[-1])
    cmax = max(int(counts.max()), 1)
    ymax = math.log10(1 + cmax)

    def X(v: float) -> float:
        return L + (v - lo) / (hi - lo) * pw

    def Y(c: float) -> float:
        return T + ph - math.log10(1 + c) / ymax * ph

    out = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>']
    k = 0
    while 10 ** k <= cmax:
        y = Y(10 ** k)
        out.append(f'<line class="grid" x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_count_label(10 ** k)}</text>')
        k += 1
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        a, b = float(edges[i]), float(edges[i + 1])
        cls = "bar"
        if hist.get("symmetric"):
            cls = "bar neg" if b <= 0 else "bar pos" if a >= 0 else "bar zero"
        x0, x1 = X(a), X(b)
        out.append(f'<rect class="{cls}" x="{x0 + 0.5:.1f}" y="{Y(c):.1f}" '
                   f'width="{max(x1 - x0 - 1, 0.8):.1f}" height="{T + ph - Y(c):.1f}">'
                   f'<title>{_esc(f"[{_g(a)}, {_g(b)}): {c:,}")}</title></rect>')
    if hist.get("symmetric") and lo < 0 < hi:
        out.append(f'<line class="zero-line" x1="{X(0):.1f}" x2="{X(0):.1f}" y1="{T}" '
                   f'y2="{T + ph}"/>')
    out.append(f'<line class="axis" x1="{L}" x2="{L + pw}" y1="{T + ph}" y2="{T + ph}"/>'
               f'<line class="axis" x1="{L}" x2="{L}" y1="{T}" y2="{T + ph}"/>')
    for t in _nice_ticks(lo, hi, 6):
        x = X(t)
        out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{T + ph}" '
                   f'y2="{T + ph + 4}"/><text x="{x:.1f}" y="{T + ph + 16}" '
                   f'text-anchor="middle">{_tick_label(t)}</text>')
    out.append(f'<text x="{L + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">'
               f'{_esc(xlabel)}</text><text x="12" y="{T + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {T + ph / 2:.1f})">count (log)</text></svg>')
    return "".join(out)


def _place_labels(pts: list[tuple[float, float, str]], right_edge: float,
                  char_w: float = 7.0, line_h: float = 13.0) -> list[tuple[float, float, str]]:
    """Label anchors ``(x, y, text-anchor)`` beside each point.

    Greedy, top to bottom: a label goes right of its point (left near the right edge) and is
    pushed down past the labels already placed and the other points it would cover, so methods
    with similar times and scores stay legible.
    """
    placed: list[tuple[float, float, float]] = [(px - 5, px + 5, py + 4) for px, py, _ in pts]
    out: list[tuple[float, float, str]] = [(0.0, 0.0, "start")] * len(pts)
    for i in sorted(range(len(pts)), key=lambda i: pts[i][1]):
        px, py, label = pts[i]
        w = char_w * len(label)
        if px + 7 + w <= right_edge:
            x0, x1, x, anchor = px + 7, px + 7 + w, px + 7, "start"
        else:
            x0, x1, x, anchor = px - 7 - w, px - 7, px - 7, "end"
        own = (px - 5, px + 5, py + 4)
        y = py + 4
        for _ in range(len(placed) + 1):
            hit = [q for q in placed if q != own and q[0] < x1 and x0 < q[1]
                   and abs(q[2] - y) < line_h]
            if not hit:
                break
            y = max(q[2] for q in hit) + line_h
        placed.append((x0, x1, y))
        out[i] = (x, y, anchor)
    return out


def svg_scatter_logx(points: Sequence[LdsPoint], *, title: str, xlabel: str = "wall time (s)",
                     ylabel: str = "LDS", highlight: str = "stride", width: int = 480,
                     height: int = 280) -> str:
    """An inline-SVG scatter, log-scale x (decades), labelled points and CI bars.

    For "LDS vs wall time": methods differ in time by orders of magnitude, so x is logarithmic;
    the ``highlight`` method (ours) is drawn in the accent colour. Points have tooltips.
    """
    pts = [p for p in points if p.seconds > 0 and math.isfinite(p.lds)]
    if not pts:
        return ""
    L, R, T, B = 48, 16, 12, 42
    pw, ph = width - L - R, height - T - B
    lx = [math.log10(p.seconds) for p in pts]
    a, b = math.floor(min(lx)), math.ceil(max(lx))
    if b <= a:
        b = a + 1
    ys = [v for p in pts for v in (p.lds, p.ci_low, p.ci_high) if v is not None]
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.08 or 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def X(s: float) -> float:
        return L + (math.log10(s) - a) / (b - a) * pw

    def Y(v: float) -> float:
        return T + ph - (v - ylo) / (yhi - ylo) * ph

    out = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>']
    for t in _nice_ticks(ylo, yhi, 5):
        y = Y(t)
        out.append(f'<line class="grid" x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>')
    for k in range(a, b + 1):
        x = X(10.0 ** k)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{T + ph}"/>'
                   f'<text x="{x:.1f}" y="{T + ph + 16}" text-anchor="middle">'
                   f'{format(10.0 ** k, "g")}</text>')
        if k < b:
            for m in range(2, 10):
                xm = X(m * 10.0 ** k)
                out.append(f'<line class="axis" x1="{xm:.1f}" x2="{xm:.1f}" y1="{T + ph}" '
                           f'y2="{T + ph + 3}"/>')
    out.append(f'<line class="axis" x1="{L}" x2="{L + pw}" y1="{T + ph}" y2="{T + ph}"/>'
               f'<line class="axis" x1="{L}" x2="{L}" y1="{T}" y2="{T + ph}"/>')
    for p in pts:
        if p.ci_low is not None and p.ci_high is not None:
            x, y0, y1 = X(p.seconds), Y(p.ci_low), Y(p.ci_high)
            out.append(f'<path class="ci" d="M{x:.1f} {y0:.1f}V{y1:.1f}M{x - 3:.1f} {y0:.1f}'
                       f'h6M{x - 3:.1f} {y1:.1f}h6"/>')
    anchors = _place_labels([(X(p.seconds), Y(p.lds), p.method) for p in pts], L + pw)
    for p, (tx, ty, anchor) in zip(pts, anchors):
        hl = " hl" if p.method == highlight else ""
        ci = (f" [{p.ci_low:.3f}, {p.ci_high:.3f}]"
              if p.ci_low is not None and p.ci_high is not None else "")
        tip = f"{p.method}: LDS {p.lds:.3f}{ci}, {p.seconds:.3g} s"
        out.append(f'<circle class="pt{hl}" cx="{X(p.seconds):.1f}" cy="{Y(p.lds):.1f}" r="4.5">'
                   f'<title>{_esc(tip)}</title></circle>'
                   f'<text class="lbl{hl}" x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}">'
                   f'{_esc(p.method)}</text>')
    out.append(f'<text x="{L + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">'
               f'{_esc(xlabel)}</text><text x="12" y="{T + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {T + ph / 2:.1f})">{_esc(ylabel)}</text></svg>')
    return "".join(out)


# ----------------------------------------------------------------------------------- sections

_CSS_BASE = """
:root{color-scheme:light dark;--fg:#1f2328;--bg:#fff;--muted:#59636e;--line:#d1d9e0;
--card:#f6f8fa;--pro:22,150,70;--opp:214,40,40;--acc:37,99,235;--sur:180,110,0}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#9198a1;
--line:#3d444d;--card:#161b22;--pro:63,185,80;--opp:248,81,73;--acc:88,166,255;--sur:210,153,34}}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1040px;padding:0 14px 48px;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;overflow-wrap:anywhere}
h1{font-size:1.5rem;margin:18px 0 4px}h2{font-size:1.2rem;margin:0 0 6px}
h3{font-size:1rem;margin:16px 0 6px}h3 small{font-weight:normal;color:var(--muted)}
code,.id,pre,.toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
.muted,.note,figcaption{color:var(--muted)}.note{font-size:.9em}
.weak{color:inherit;border-left:4px solid rgb(var(--opp));padding-left:.5em}
section{border-top:1px solid var(--line);padding:14px 0}
dl.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:6px 14px;
margin:8px 0}
dl.kv div{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:4px 8px}
dl.kv dt{font-size:.75rem;color:var(--muted)}dl.kv dd{margin:0;font-weight:600}
.tw{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line);
border-radius:6px;margin:4px 0 10px}
table{border-collapse:collapse;width:100%;min-width:560px}
th,td{text-align:left;vertical-align:top;padding:4px 8px;border-bottom:1px solid var(--line)}
th{background:var(--card);font-size:.85em;white-space:nowrap}tr:last-child td{border-bottom:0}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.id{white-space:nowrap}td.txt{min-width:18em}
details summary{cursor:pointer}.full{white-space:pre-wrap;margin-top:4px;padding:6px;
background:var(--card);border-radius:4px;max-height:24em;overflow:auto}
blockquote.qtext{margin:6px 0;padding:6px 10px;border-left:3px solid var(--line);
background:var(--card);white-space:pre-wrap}
figure{margin:10px 0}svg.plot{width:100%;max-width:560px;height:auto;display:block;
color:var(--fg)}svg.plot text{font:12px system-ui,sans-serif;fill:currentColor}
svg.plot .axis,svg.plot .ci{stroke:currentColor;stroke-width:1;fill:none}
svg.plot .grid{stroke:var(--line);stroke-width:1}svg.plot .zero-line{stroke:currentColor;
stroke-dasharray:3 3;opacity:.6}
.bar{fill:rgb(var(--acc))}.bar.pos{fill:rgb(var(--pro))}.bar.neg{fill:rgb(var(--opp))}
.bar.zero{fill:var(--muted)}.pt{fill:var(--muted);stroke:var(--bg)}
.pt.hl{fill:rgb(var(--acc))}.lbl.hl{font-weight:700;fill:rgb(var(--acc))}
nav ol{padding-left:1.6em;margin:6px 0}nav li{margin:2px 0}
.tokrow{display:flex;flex-wrap:wrap;gap:2px 10px;padding:4px 0;border-bottom:1px dotted var(--line)}
.toklab{flex:0 0 13em;font-size:.85em}.toklab .k-p{color:rgb(var(--pro));font-weight:700}
.toklab .k-o{color:rgb(var(--opp));font-weight:700}
.toks{flex:1 1 22em;min-width:0;white-space:pre-wrap;line-height:1.7}
.toks span{border-radius:2px}
.legend{display:flex;align-items:center;gap:6px;font-size:.85em;flex-wrap:wrap;margin:4px 0}
.legend .sw{display:inline-flex}.legend .sw span{width:14px;height:14px;display:inline-block}
@media (max-width:600px){body{font-size:14px;padding:0 10px 36px}.toklab{flex-basis:100%}}
"""


def _css() -> str:
    """The page's only stylesheet; the per-token colour classes are generated (``LEVELS``
    alpha steps of the proponent, opponent and surprise colours, which the dark theme
    redefines), so a highlighted token costs a short class name instead of an inline style."""
    steps = []
    for lv in range(1, LEVELS + 1):
        alpha = 0.1 + 0.75 * lv / LEVELS
        steps.append(f".p{lv}{{background:rgba(var(--pro),{alpha:.2f})}}"
                     f".n{lv}{{background:rgba(var(--opp),{alpha:.2f})}}"
                     f".s{lv}{{background:rgba(var(--sur),{alpha:.2f})}}")
    return _CSS_BASE.strip() + "\n" + "\n".join(steps)


def _level(v: float, scale: float) -> int:
    if not (scale > 0 and math.isfinite(v)):
        return 0
    return min(LEVELS, int(round(LEVELS * abs(v) / scale)))


def _token_text(tok: str) -> str:
    return "∅" if tok == "" else tok.replace("\n", "↵\n")


def _token_spans(tokens: Sequence[str], values: Sequence[float], scale: float, pos: str,
                 neg: str, fmt: str) -> str:
    """Inline spans, one per token: colour class by the value's sign and size relative to
    ``scale``, the value as a ``title`` tooltip. Adjacent (no whitespace between spans) so the
    tokens read as the original text."""
    out = []
    for tok, v in zip(tokens, values):
        fv = float(v) if _num(v) is not None else float("nan")
        lv = _level(fv, scale)
        cls = f' class="{pos if fv > 0 else neg}{lv}"' if lv else ""
        tip = "n/a" if math.isnan(fv) else format(fv, fmt)
        out.append(f'<span{cls} title="{_esc(tip)}">{_esc(_token_text(str(tok)))}</span>')
    return "".join(out)


def _legend(scale: float, label_neg: str, label_pos: str) -> str:
    sw = "".join(f'<span class="n{lv}"></span>' for lv in range(LEVELS, 0, -1))
    sw += '<span></span>' + "".join(f'<span class="p{lv}"></span>' for lv in range(1, LEVELS + 1))
    return (f'<div class="legend"><span>{_esc(label_neg)} −{_g(scale, ".2g")}</span>'
            f'<span class="sw">{sw}</span><span>+{_g(scale, ".2g")} {_esc(label_pos)}</span>'
            f'</div>')


def render_tokens(entry: Mapping, *, max_rows: int = TOKEN_ROWS,
                  max_tokens: int = TOKENS_PER_ROW) -> str:
    """Per-token highlights of one query: the base model's surprise, then one row per example.

    All example rows share one colour scale (the largest ``|effect|`` among them), so rows are
    comparable: a pale row is an example that moved few tokens, not a rescaled one.
    """
    tokens = [str(t) for t in entry.get("tokens", [])][:max_tokens]
    examples = list(entry.get("examples", []))[:max_rows]
    if not tokens:
        return '<p class="note">tokens.json lists no scored tokens for this query.</p>'
    effects = [np.asarray([_num(v) if _num(v) is not None else np.nan
                           for v in ex["effect"][:max_tokens]], float) for ex in examples]
    finite = [np.abs(e[np.isfinite(e)]) for e in effects]
    scale = max((float(f.max()) for f in finite if f.size), default=0.0)
    out = [_legend(scale, "lowered by the example", "raised"),
           '<div class="tokgrid">']
    lp = entry.get("base_logprob")
    if isinstance(lp, list):
        surprise = [-(_num(v) if _num(v) is not None else np.nan) for v in lp[:max_tokens]]
        fin = [s for s in surprise if math.isfinite(s)]
        s_scale = max(fin, default=0.0)
        out.append('<div class="tokrow"><div class="toklab">base model <span class="muted">'
                   '(shade: −log p)</span></div><div class="toks">'
                   + _token_spans(tokens, surprise, s_scale, "s", "s", ".3g")
                   + "</div></div>")
    rank = {"proponent": 0, "opponent": 0}
    for ex, eff in zip(examples, effects):
        kind = str(ex.get("kind", ""))
        if kind in rank:
            rank[kind] += 1
        tag = ({"proponent": f'<span class="k-p">P{rank["proponent"]}</span>',
                "opponent": f'<span class="k-o">O{rank["opponent"]}</span>'}.get(kind, "·"))
        mean = float(np.nanmean(eff)) if np.isfinite(eff).any() else float("nan")
        out.append(f'<div class="tokrow"><div class="toklab" title="mean effect over the '
                   f'scored tokens: {_esc(format(mean, "+.3g"))}">{tag} <span class="id">'
                   f'{_esc(ex["id"])}</span></div><div class="toks">'
                   + _token_spans(tokens, eff, scale, "p", "n", "+.2e") + "</div></div>")
    out.append("</div>")
    n_tok, n_ex = len(entry.get("tokens", [])), len(entry.get("examples", []))
    if n_tok > max_tokens or n_ex > max_rows:
        out.append(f'<p class="note">Showing {len(tokens)} of {n_tok} tokens and '
                   f'{len(examples)} of {n_ex} examples.</p>')
    return "".join(out)


def _examples_table(entries: Sequence[Mapping], selfinf: Mapping[str, float] | None) -> str:
    if not entries:
        return '<p class="note">(none: no training example has a score of this sign)</p>'
    si_head = '<th>self-inf.</th>' if selfinf is not None else ""
    rows = []
    for r, e in enumerate(entries, 1):
        si = ""
        if selfinf is not None:
            si = f'<td class="num">{_g(selfinf.get(str(e["id"])))}</td>'
        idx = f' title="training index {_esc(e["index"])}"' if "index" in e else ""
        rows.append(f'<tr><td class="num">{r}</td><td class="id"{idx}>{_esc(e["id"])}</td>'
                    f'<td class="num">{_g(e["score"], "+.3g")}</td>{si}'
                    f'<td class="txt">{_text_cell(e.get("text"))}</td></tr>')
    return (f'<div class="tw"><table><thead><tr><th>#</th><th>id</th><th>score</th>{si_head}'
            f'<th>text</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _query_section(i: int, rec: Mapping, score_row: np.ndarray | None,
                   tokens: Mapping | None, selfinf: Mapping[str, float] | None,
                   has_tokens_file: bool) -> str:
    meta = []
    if _num(rec.get("base_loss")) is not None:
        meta.append(f"base loss {_g(rec['base_loss'], '.4g')} nats/token")
    if isinstance(rec.get("estimator"), str):
        meta.append(rec["estimator"].replace("_", " "))
    if _num(rec.get("lambda")) is not None:
        meta.append(f"λ {_g(rec['lambda'])}")
    r2 = _num(rec.get("cv_r2"))
    if r2 is not None:
        meta.append(f"held-out R² {r2:.3f}")
    if score_row is not None:
        nz = int(np.count_nonzero(np.asarray(score_row)))
        meta.append(f"{nz:,} of {score_row.size:,} scores nonzero")
    text = rec.get("query_text")
    qtext = (f'<blockquote class="qtext">{_esc(_cap(str(text), QUERY_TEXT_CHARS))}</blockquote>'
             if text is not None else '<p class="note">(query text not stored)</p>')
    parts = [f'<section class="query" id="q{i}"><h2>Query {i + 1}: <code>{_esc(rec["query_id"])}'
             f'</code></h2>',
             f'<p class="muted">{" · ".join(meta)}</p>' if meta else "",
             (f'<p class="note weak">Weak signal: the fit explains {r2:.1%} of the held-out '
              f'responses (below {WEAK_SIGNAL_R2:.0%}); these scores are mostly the solver\'s '
              f'prior, do not act on them alone.</p>'
              if r2 is not None and r2 < WEAK_SIGNAL_R2 else ""), qtext,
             "<h3>Top proponents <small>training on them lowers this query's loss</small></h3>",
             _examples_table(rec.get("proponents", []), selfinf),
             "<h3>Top opponents <small>training on them raises it</small></h3>",
             _examples_table(rec.get("opponents", []), selfinf)]
    if tokens is not None:
        parts.append("<h3>Per-token effects <small>which tokens each example made more (green) "
                     "or less (red) likely; hover or long-press a token for its value</small></h3>")
        parts.append(render_tokens(tokens))
    elif has_tokens_file:
        parts.append('<p class="note">No per-token effects for this query in tokens.json.</p>')
    parts.append("</section>")
    return "".join(parts)


def model_summary(info: Mapping | None) -> list[tuple[str, str]]:
    """The model's identity from ``run_info.json`` as ``(label, value)``: path, parameter count,
    fingerprint, what the operators read."""
    if info is None:
        return []
    m = info.get("model") if isinstance(info.get("model"), Mapping) else {}
    params = _num(m.get("parameters"))
    items = [("model", m.get("path") or "(in memory: no path)"),
             ("parameters", f"{int(params):,}" if params is not None else None),
             ("fingerprint", m.get("fingerprint")), ("reader", m.get("reader"))]
    return [(k, str(v)) for k, v in items if v is not None]


def svg_line(ys: Sequence[float], xs: Sequence[float], *, title: str, xlabel: str,
             ylabel: str, width: int = 480, height: int = 220) -> str:
    """A line plot as inline SVG (the operator-training loss curve)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys)
           if math.isfinite(float(x)) and math.isfinite(float(y))]
    if len(pts) < 2:
        return ""
    L, R, T, B = 56, 12, 24, 36
    pw, ph = width - L - R, height - T - B
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)

    def X(v: float) -> float:
        return L + (v - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return T + (1 - (v - y0) / (y1 - y0)) * ph

    path = " ".join(f"{'M' if i == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for i, (x, y) in
                    enumerate(pts))
    ticks = "".join(f'<text x="{L - 4}" y="{Y(t) + 4:.1f}" text-anchor="end" class="tick">'
                    f"{_esc(_tick_label(t))}</text>" for t in _nice_ticks(y0, y1, 4)
                    if y0 <= t <= y1)
    xt = "".join(f'<text x="{X(t):.1f}" y="{T + ph + 14}" text-anchor="middle" class="tick">'
                 f"{_esc(_tick_label(t))}</text>" for t in _nice_ticks(x0, x1, 5)
                 if x0 <= t <= x1)
    return (f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
            f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>'
            f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>{ticks}{xt}'
            f'<text x="{L + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">{_esc(xlabel)}'
            f'</text><text x="12" y="{T + ph / 2:.0f}" transform="rotate(-90 12 '
            f'{T + ph / 2:.0f})" text-anchor="middle">{_esc(ylabel)}</text>'
            f'<text x="{L}" y="14">{_esc(title)}</text></svg>')


def _stages_section(info: Mapping | None) -> str:
    """Each stage's wall time and, for trained operators, the training loss curve."""
    if info is None:
        return ('<p class="note">No run_info.json in the run directory: no model identity, '
                'stage times or loss curve (runs written before it existed).</p>')
    parts = []
    secs = info.get("stage_seconds")
    if isinstance(secs, Mapping) and secs:
        rows = "".join(f'<tr><td>{_esc(k)}</td><td class="num">{_g(_num(v), ".3g")} s</td></tr>'
                       for k, v in secs.items())
        parts.append('<h3>Wall time per stage <small>a reused stage shows the time to load it'
                     f'</small></h3><div class="tw"><table><tbody>{rows}</tbody></table></div>')
    hist = info.get("history")
    if isinstance(hist, list) and hist:
        pts = [h for h in hist if isinstance(h, Mapping)]
        key = next((k for k in ("loss", "total", "fidelity") if pts and k in pts[0]), None)
        if key is not None:
            xs = [_num(h.get("step", i)) or 0.0 for i, h in enumerate(pts)]
            ys = [_num(h.get(key)) for h in pts]
            svg = svg_line([y if y is not None else float("nan") for y in ys], xs,
                           title=f"Operator training: {key}", xlabel="step", ylabel=key)
            if svg:
                parts.append(f"<h3>Operator-training loss curve</h3>{svg}")
            else:
                last = pts[-1]
                parts.append(f'<p class="muted">Operator-training {_esc(key)}: '
                             f'{_g(_num(last.get(key)), ".4g")} at step '
                             f'{_esc(last.get("step", "?"))} (too few logged points for a curve; '
                             f'lower train.log_every for more).</p>')
    elif info.get("operators") == "closed_form":
        parts.append('<p class="muted">Closed-form operators: nothing is trained, so there is '
                     'no loss curve.</p>')
    return "".join(parts)


def _dig(cfg: Mapping | None, *keys: str) -> Any:
    cur: Any = cfg
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return cur


def config_summary(config: Mapping | None, n: int | None) -> list[tuple[str, str]]:
    """The config values a reader needs to interpret the scores, as ``(label, value)``.

    K is resolved as the run resolved it when ``design.num_subsets`` is null (expander design
    and n known), so the page shows the number of operators actually trained. A closed-form run
    (``operators: closed_form``) shows its own settings: it trains nothing and uses no subsets,
    so the design, training and solve settings in its config do not describe it.
    """
    if config is None:
        return []
    method = str(_dig(config, "method") or "stride")
    if method != "stride":
        return [("method", method)] + _method_settings(config, method)
    if _dig(config, "operators") == "closed_form":
        items = [("method", "stride"), ("operators", "closed form"),
                 ("site", _dig(config, "steering", "site")),
                 ("reader", _dig(config, "closed_form", "reader")),
                 ("output damping", _dig(config, "closed_form", "output_damping")),
                 ("reader damping", _dig(config, "closed_form", "reader_damping")),
                 ("norm power", _dig(config, "closed_form", "norm_power")),
                 ("seed", _dig(config, "seed")), ("top-k", _dig(config, "topk"))]
        return [(k, "–" if v is None else str(v)) for k, v in items]
    K = _dig(config, "design", "num_subsets")
    d = _dig(config, "design", "per_example")
    kind = _dig(config, "design", "kind")
    k_text = "–" if K is None else str(K)
    if K is None and kind in (None, "expander") and n and isinstance(d, int) and d > 0:
        try:
            from stride_jax.subsets import default_num_subsets
            k_text = f"{default_num_subsets(n, d)} (auto)"
        except (ImportError, ValueError):
            k_text = "auto"
    items = [("method", "stride"),
             ("site", _dig(config, "steering", "site")), ("rank", _dig(config, "steering", "rank")),
             ("K subsets", k_text), ("per example d", d),
             ("estimator", _dig(config, "solve", "estimator")), ("design", kind),
             ("epochs", _dig(config, "train", "epochs")), ("seed", _dig(config, "seed")),
             ("top-k", _dig(config, "topk"))]
    return [(k, "–" if v is None else str(v)) for k, v in items]


def _method_settings(config: Mapping, method: str) -> list[tuple[str, str]]:
    """The settings of a method other than STRIDE (``methods.<name>`` of ``attribute.yaml``);
    for a mixture, each component's section."""
    names = ([p.split("=")[0].strip() for p in method[4:].split(",")]
             if method.startswith("mix:") else [method])
    section = {"kfac": "ekfac", "if": "influence", "graddot": None, "repsim": None}
    items: list[tuple[str, str]] = []
    for name in names:
        sub = _dig(config, "methods", section.get(name, name) or "")
        if isinstance(sub, Mapping):
            items += [(f"{name} {k}", "–" if v is None else str(v)) for k, v in sub.items()
                      if not isinstance(v, (Mapping, list))]
    return items + [("seed", str(_dig(config, "seed"))), ("top-k", str(_dig(config, "topk")))]


def _kv(items: Sequence[tuple[str, str]]) -> str:
    return ('<dl class="kv">' + "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>"
                                        for k, v in items) + "</dl>")


def _row_chunks(a: np.ndarray, rows: int = 256) -> list[np.ndarray]:
    return [a[i:i + rows] for i in range(0, a.shape[0], rows)]


def _scores_figure(scores: np.ndarray) -> str:
    hist = histogram_counts(_row_chunks(scores), symmetric=True)
    if hist is None:
        return '<p class="note">scores.npy holds no finite score.</p>'
    svg = svg_histogram(hist, title="Histogram of all attribution scores", xlabel="score")
    cap = (f"All {hist['n']:,} scores (queries × training examples): {hist['positive']:,} "
           f"positive (green), {hist['negative']:,} negative (red), {hist['zeros']:,} exactly "
           f"zero; range {_g(hist['min'])} … {_g(hist['max'])}. Counts on a log scale.")
    return f"<figure>{svg}<figcaption>{_esc(cap)}</figcaption></figure>"


def _selfinf_section(selfinf: tuple[list[str], np.ndarray], texts: Mapping[str, Any]) -> str:
    ids, score = selfinf
    hist = histogram_counts([score])
    parts = ["<section id=\"selfinf\"><h2>Self-influence</h2><p class=\"muted\">How much "
             "training on an example lowers its own loss: high values flag memorised or "
             "atypical examples.</p>"]
    if hist is not None:
        svg = svg_histogram(hist, title="Histogram of self-influence",
                            xlabel="self-influence (nats/token)")
        parts.append(f"<figure>{svg}"
                     f"<figcaption>{hist['n']:,} training examples; counts on a log "
                     f"scale.</figcaption></figure>")
    s = np.where(np.isfinite(score), score, -np.inf)
    top = [int(i) for i in np.argsort(-s, kind="stable")[:SELFINF_TOP] if np.isfinite(score[i])]
    if top:
        rows = "".join(f'<tr><td class="num">{r}</td><td class="id">{_esc(ids[i])}</td>'
                       f'<td class="num">{_g(score[i])}</td>'
                       f'<td class="txt">{_text_cell(texts.get(ids[i]), missing="–")}</td></tr>'
                       for r, i in enumerate(top, 1))
        parts.append(f"<h3>Top {len(top)} by self-influence <small>texts of the examples listed "
                     f"for some query</small></h3><div class=\"tw\"><table><thead>"
                     f"<tr><th>#</th><th>id</th><th>self-inf.</th><th>text</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table></div>")
    parts.append("</section>")
    return "".join(parts)


def _lds_section(lds: tuple[dict[str, list[LdsPoint]], dict[str, str]]) -> str:
    tasks, captions = lds
    parts = ['<section id="lds"><h2>LDS vs wall time</h2><p class="muted">Linear Datamodeling '
             'Score (mean over queries, 95% CI bars; higher is better) against each method\'s '
             'wall time on a log scale'
             + (f"; measured on {_esc(captions['_device'])}" if "_device" in captions else "")
             + ".</p>"]
    for task, pts in tasks.items():
        svg = svg_scatter_logx(pts, title=f"LDS vs wall time, task {task}")
        cap = f"Task {task}" + (f": {captions[task]}" if captions.get(task) else "")
        if not svg:
            parts.append(f'<p class="note">{_esc(cap)}: no row with an LDS and a positive '
                         f'time.</p>')
            continue
        parts.append(f"<figure>{svg}<figcaption>{_esc(cap)}.</figcaption></figure>")
    parts.append("</section>")
    return "".join(parts)


def render_report(run: RunData, *, lds: tuple[dict[str, list[LdsPoint]], dict[str, str]]
                  | None = None, title: str | None = None) -> str:
    """The whole page as one string (pure: the same inputs give the same bytes)."""
    from stride_jax import __version__

    method = str(_dig(run.config, "method") or "stride") if run.config is not None else None
    title = title or (f"stride-jax attribution report: {run.run_dir.name or run.run_dir}"
                      + (f" ({method})" if method else ""))
    train_ids = run.ids["train"] if run.ids is not None else None
    n = (len(train_ids) if train_ids is not None
         else run.scores.shape[1] if run.scores is not None else None)
    q_ids = run.ids["queries"] if run.ids is not None else None
    row_of = ({str(q): j for j, q in enumerate(q_ids)} if q_ids is not None
              else {str(r["query_id"]): j for j, r in enumerate(run.records)})
    selfinf_map = (None if run.selfinf is None
                   else {i: float(s) for i, s in zip(run.selfinf[0], run.selfinf[1])})
    texts: dict[str, Any] = {}
    for rec in run.records:
        for side in ("proponents", "opponents"):
            for e in rec.get(side, []):
                if e.get("text") is not None:
                    texts.setdefault(str(e["id"]), e["text"])

    summary = [("training examples", f"{n:,}" if n is not None else "–"),
               ("queries", f"{run.num_queries:,}")]
    summary += model_summary(run.info)
    summary += config_summary(run.config, n)
    shown = len(run.records)
    head = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="stride-jax {_esc(__version__)}">'
            f"<title>{_esc(title)}</title><style>{_css()}</style></head><body>",
            f"<header><h1>{_esc(title)}</h1><p class=\"muted\">Run <code>{_esc(run.run_dir)}</code>"
            + (f" · method <b>{_esc(method)}</b>" if method else "") +
            f" · stride-jax {_esc(__version__)} · a score &gt; 0 means training on the example "
            f"lowers the query's loss (proponent), &lt; 0 raises it (opponent).</p></header>",
            '<section id="summary"><h2>Run summary</h2>', _kv(summary)]
    if run.scores is not None:
        head.append(_scores_figure(run.scores))
    else:
        head.append('<p class="note">No scores.npy in the run directory: no score histogram.</p>')
    head.append(_stages_section(run.info))
    if run.config_text is not None:
        head.append(f"<details><summary>attribute.yaml</summary><pre class=\"full\">"
                    f"{_esc(run.config_text)}</pre></details>")
    head.append("</section>")
    if run.selfinf is not None:
        head.append(_selfinf_section(run.selfinf, texts))
    if lds is not None:
        head.append(_lds_section(lds))

    nav = ['<nav id="queries"><h2>Queries</h2>']
    if shown < run.num_queries:
        nav.append(f'<p class="note">Showing the first {shown} of {run.num_queries} queries.</p>')
    nav.append("<ol>" + "".join(
        f'<li><a href="#q{i}"><code>{_esc(r["query_id"])}</code></a> '
        f'<span class="muted">{_esc(_flat(str(r.get("query_text", "")))[:80])}</span></li>'
        for i, r in enumerate(run.records)) + "</ol></nav>")

    body = []
    for i, rec in enumerate(run.records):
        qid = str(rec["query_id"])
        j = row_of.get(qid)
        row = (run.scores[j] if run.scores is not None and j is not None
               and j < run.scores.shape[0] else None)
        tok = run.tokens.get(qid) if run.tokens is not None else None
        body.append(_query_section(i, rec, row, tok, selfinf_map, run.tokens is not None))
    foot = ("<footer class=\"note\"><p>Self-contained page written by <code>stride-jax report"
            "</code>: no scripts, no external resources.</p></footer></body></html>\n")
    return "".join(head) + "".join(nav) + "".join(body) + foot


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 lds_results: str | Path | Mapping | None = None, title: str | None = None,
                 max_queries: int | None = None) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``run_dir/report.html``).

    Args:
      lds_results: the LDS benchmark's JSON (a path, or the parsed object) for the "LDS vs
        wall time" plot.
      title: page title (default: from the run directory's name).
      max_queries: show only the first this many queries (the histograms still use all scores).

    Returns the path written (atomically: a reader never sees half a page).
    """
    from stride_jax.io.atomic import atomic_write_text
    from stride_jax.io.outdir import check_output_file

    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    if out is not None or Path(run_dir).is_dir():   # else load_run says what is wrong
        check_output_file(target, example="report.html")   # before any work
    run = load_run(run_dir, max_queries=max_queries)
    lds = load_lds_results(lds_results) if lds_results is not None else None
    if not target.parent.is_dir():
        raise FileNotFoundError(f"no directory {target.parent} to write {target.name} into; "
                                f"create it or pass another --out")
    atomic_write_text(target, render_report(run, lds=lds, title=title))
    return target
