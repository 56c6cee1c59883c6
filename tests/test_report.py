"""`stride-jax report`: a self-contained, escaped, well-formed HTML page per attribution run.

The run directories are written by hand (the files `Attribution.write` produces, plus a small
fake tokens.json / selfinf.json): the report only reads files, so no model is trained here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from stride_jax.apps.report import (
    LdsPoint,
    histogram_counts,
    load_lds_results,
    svg_histogram,
    svg_scatter_logx,
    write_report,
)
from stride_jax.cli import main

EVIL = "<script>alert('x')</script> & \"quoted\" \x00 text"
REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, *, tokens: bool = False, selfinf: bool = False, n: int = 300,
             Q: int = 4, k: int = 3) -> Path:
    """A run directory shaped like `stride-jax attribute --out` output; sparse scores (mostly 0)."""
    run = root / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    scores = np.zeros((Q, n), np.float32)
    for q in range(Q):
        idx = rng.choice(n, 40, replace=False)
        scores[q, idx] = rng.normal(0, 1e-3, 40)
    train_ids = [f"train-{i:04d}" for i in range(n)]
    query_ids = [f"query-{q}" for q in range(Q)]
    texts = [f"training row {i} " + "word " * (5 + i % 60) for i in range(n)]
    texts[int(np.argmax(scores[0]))] = EVIL + " long tail " * 30
    lines = []
    for q in range(Q):
        order = np.argsort(-scores[q], kind="stable")
        pro = [int(i) for i in order[:k] if scores[q, i] > 0]
        opp = [int(i) for i in order[::-1][:k] if scores[q, i] < 0]
        lines.append(json.dumps({
            "query_id": query_ids[q], "query_text": f"the text of query {q}\nsecond line",
            "base_loss": 3.5 + q, "lambda": 1e-4,
            "proponents": [{"id": train_ids[i], "index": i, "score": float(scores[q, i]),
                            "text": texts[i]} for i in pro],
            "opponents": [{"id": train_ids[i], "index": i, "score": float(scores[q, i]),
                           "text": texts[i]} for i in opp]}))
    (run / "topk.jsonl").write_text("\n".join(lines) + "\n")
    np.save(run / "scores.npy", scores)
    (run / "ids.json").write_text(json.dumps({"queries": query_ids, "train": train_ids}))
    (run / "attribute.yaml").write_text(
        "design:\n  kind: expander\n  num_subsets: null\n  per_example: 40\nsteering:\n"
        "  site: logits\n  rank: 32\nsolve:\n  estimator: auto\nseed: 0\ntopk: 3\n")
    if tokens:
        toks = ["The", " cat", " <b>sat</b>", "\n", " on", " the", " mat"]
        entries = []
        for q in range(2):  # only the first two queries: the others must render without
            rec = json.loads(lines[q])
            ex = [{"id": e["id"], "index": e["index"], "kind": kind,
                   "effect": [float(v) for v in rng.normal(0, 1e-3, len(toks))]}
                  for kind, side in (("proponent", "proponents"), ("opponent", "opponents"))
                  for e in rec[side]]
            entries.append({"query_id": query_ids[q], "tokens": toks,
                            "base_logprob": [-0.5 * (t + 1) for t in range(len(toks))],
                            "examples": ex})
        (run / "tokens.json").write_text(json.dumps({"queries": entries}))
    if selfinf:
        (run / "selfinf.json").write_text(json.dumps(
            {"ids": train_ids, "score": [float(v) for v in rng.exponential(1.0, n)]}))
    return run


VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}


class Checker(HTMLParser):
    """Every non-void element closed in order; collects tags, attributes and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Checker:
    c = Checker()
    c.feed(page)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed: {c.stack}"
    return c


def check_self_contained(c: Checker, page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not any(k == "src" for _, k, _ in c.attrs)
    hrefs = [v for _, k, v in c.attrs if k == "href"]
    assert hrefs and all(v.startswith("#") for v in hrefs), hrefs[:5]
    assert "@import" not in page and "url(" not in page
    assert "script" not in c.tags and "link" not in c.tags and "iframe" not in c.tags


def test_report_page(tmp_path):
    run = make_run(tmp_path, tokens=True, selfinf=True)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    c = parse(page)
    check_self_contained(c, page)
    for tag in ("html", "head", "body", "title", "style", "section", "table", "details"):
        assert c.tags.get(tag), tag
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert 'class="tw"' in page  # tables scroll inside a wrapper on narrow screens

    # every query and every listed example, by id, and the untrusted text only escaped
    text = "".join(c.text)
    for rec in map(json.loads, (run / "topk.jsonl").read_text().splitlines()):
        assert rec["query_id"] in text
        for e in rec["proponents"] + rec["opponents"]:
            assert e["id"] in text
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "\x00" not in page
    assert "&lt;b&gt;sat&lt;/b&gt;" in page  # a token's text is escaped too

    # summary: n, Q and the key config values (K resolved from n and d)
    for label, value in (("training examples", "300"), ("queries", "4"), ("site", "logits"),
                         ("rank", "32"), ("per example d", "40"), ("estimator", "auto"),
                         ("K subsets", "375 (auto)")):
        assert re.search(f"<dt>{re.escape(label)}</dt><dd>{re.escape(value)}</dd>", page), label

    # plots: the score histogram and the self-influence histogram; no LDS plot without --lds
    assert page.count("<svg") == 2
    assert "Histogram of all attribution scores" in page and "Self-influence" in page
    assert "LDS vs wall time" not in page
    # per-token rows for the two queries in tokens.json, a graceful note for the others
    sections = re.findall(r'<section class="query" id="q(\d)">(.*?)</section>', page, re.S)
    assert [s[0] for s in sections] == ["0", "1", "2", "3"]
    for q, body in sections:
        if int(q) < 2:
            assert body.count('class="tokrow"') == 1 + body.count("<tr>") - 2  # base + examples
            assert re.search(r'<span class="[pn]\d" title="[+-]\d\.\d\de-\d\d">', body)
        else:
            assert "tokrow" not in body and "No per-token effects" in body


def test_report_without_optional_files(tmp_path):
    run = make_run(tmp_path)
    (run / "scores.npy").unlink()
    (run / "attribute.yaml").unlink()
    page = write_report(run, tmp_path / "r.html", max_queries=2, title="<T>").read_text()
    c = parse(page)
    check_self_contained(c, page)
    assert "<title>&lt;T&gt;</title>" in page
    assert 'class="tokrow"' not in page and "Per-token" not in page
    assert "<svg" not in page and "No scores.npy" in page
    assert "Showing the first 2 of 4 queries" in page
    assert "query-1" in page and "query-2" not in page


def test_report_lds_plot(tmp_path):
    run = make_run(tmp_path)
    page = write_report(run, lds_results=REPO / "benchmarks" / "results" / "lds.json").read_text()
    parse(page)
    assert "LDS vs wall time" in page
    tasks, _ = load_lds_results(REPO / "benchmarks" / "results" / "lds.json")
    assert page.count("<svg") == 1 + len(tasks)
    lds_part = page[page.index('id="lds"'):]
    for pts in tasks.values():
        for p in pts:
            assert f">{p.method}</text>" in lds_part
    # an inline mapping in the simplest accepted form works too
    page = write_report(run, lds_results={"rows": [{"method": "stride", "lds": 0.4, "seconds": 3},
                                                   {"method": "bm25", "lds": 0.2,
                                                    "seconds": 0.01}]}).read_text()
    assert page.count("<svg") == 2 and 'class="pt hl"' in page


def test_svg_helpers():
    hist = histogram_counts([np.zeros(1000), np.array([1e-3, -2e-3, np.nan])], symmetric=True)
    assert hist["n"] == 1002 and hist["zeros"] == 1000 and hist["counts"].sum() == 1002
    assert len(hist["counts"]) % 2 == 1 and hist["edges"][0] == -hist["edges"][-1]
    svg = svg_histogram(hist, title="t", xlabel="x")
    assert svg.count("<rect") == 3 and "bar zero" in svg and "bar pos" in svg
    assert histogram_counts([np.array([np.inf])]) is None
    pts = [LdsPoint("a", 0.01, 0.2, 0.1, 0.3), LdsPoint("b", 0.011, 0.2), LdsPoint("c", 200, 0.5)]
    svg = svg_scatter_logx(pts, title="s")
    ys = [float(y) for y in re.findall(r'<text class="lbl[^"]*" x="[\d.]+" y="([\d.]+)"', svg)]
    assert len(ys) == 3 and abs(ys[0] - ys[1]) >= 12  # coincident points: labels pushed apart
    assert svg_scatter_logx([LdsPoint("z", 0.0, 0.1)], title="s") == ""


def test_a_closed_form_run_is_summarised_by_its_own_settings(tmp_path):
    """A closed-form run trains nothing and has no subsets: the page shows its operators and
    damping, and each query's estimator, never the unused K, d, epochs or solve estimator."""
    from stride_jax import AttributeConfig, Attribution, with_overrides
    from stride_jax.apps.report import config_summary
    from stride_jax.config import to_dict
    cfg = to_dict(with_overrides(AttributeConfig(), "closed_form.output_damping=0.05"))
    summary = dict(config_summary(cfg, n=300))
    assert summary["operators"] == "closed form" and summary["output damping"] == "0.05"
    assert not {"K subsets", "per example d", "estimator", "epochs"} & set(summary)
    trained = dict(config_summary({**cfg, "operators": "trained"}, n=300))
    assert trained["K subsets"] == "375 (auto)" and "operators" not in trained
    rng = np.random.default_rng(0)
    Attribution(rng.normal(size=(2, 5)).astype(np.float32), ["q0", "q1"],
                [f"t{i}" for i in range(5)], np.zeros((2, 0)), rng.random(2),
                estimator_q=np.full(2, "closed_form")).write(tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("closed form") == 2 and "λ" not in page


def test_cli_round_trip_and_errors(tmp_path, capsys):
    run = make_run(tmp_path, tokens=True)
    assert main(["report", str(run), "--max-queries", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert Path(out) == run / "report.html" and Path(out).stat().st_size > 1000

    def error(*argv):
        assert main(["report", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("stride-jax report: error: ") and "\n" not in err
        return err

    assert "no run directory" in error(tmp_path / "nope") and "runs/demo/attribution" in error(
        tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no topk.jsonl" in error(empty)
    with open(run / "topk.jsonl", "a") as f:
        f.write("{not json\n")
    err = error(run)
    assert "topk.jsonl line 5 is not valid JSON" in err
    (run / "topk.jsonl").write_text('{"query_id": "q", "proponents": [{"id": "a"}]}\n')
    assert "'id' and 'score'" in error(run)
    (tmp_path / "b").mkdir()
    run2 = make_run(tmp_path / "b")
    assert "not LDS benchmark results" in error(run2, "--lds", run2 / "ids.json")
    assert "no LDS results file" in error(run2, "--lds", tmp_path / "missing.json")
    with pytest.raises(SystemExit) as e:     # argparse checks it, with the same one-line contract
        main(["report", str(run2), "--max-queries", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stride-jax report: error: ") and "\n" not in err
    assert "--max-queries: 0 must be >= 1" in err
    (run2 / "tokens.json").write_text(json.dumps(
        {"queries": [{"query_id": "query-0", "tokens": ["a", "b"],
                      "examples": [{"id": "x", "effect": [1.0]}]}]}))
    assert "tokens.json query 'query-0'" in error(run2)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_headless_browser_render(tmp_path):
    """The page renders in a real browser, on a phone-sized and a laptop-sized window."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium (or chromium-browser) on PATH to render the report")
    run = make_run(tmp_path, tokens=True, selfinf=True)
    page = write_report(run, lds_results=REPO / "benchmarks" / "results" / "lds.json")
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for q in range(4):
        assert f"query-{q}" in dom.stdout
    tasks, _ = load_lds_results(REPO / "benchmarks" / "results" / "lds.json")
    assert dom.stdout.count("<svg") == 2 + len(tasks) and "<script" not in dom.stdout.lower()
    for name, (w, h) in {"phone": (390, 844), "laptop": (1280, 800)}.items():
        shot = tmp_path / f"{name}.png"
        r = subprocess.run(base + [f"--screenshot={shot}", f"--window-size={w},{h}", url],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
        assert shot.stat().st_size > 5000
        assert _png_size(shot) == (w, h)


def test_run_json_shows_the_model_stage_times_loss_curve_and_weak_queries(tmp_path):
    """run_info.json (model identity, stage times, loss curve) and per-query held-out R^2 reach the
    page: the model's path, parameter count and fingerprint, a row per stage, an SVG loss
    curve, and a visible weak-signal note on the query whose fit explains little."""
    run = make_run(tmp_path)
    (run / "run_info.json").write_text(json.dumps({
        "method": "stride", "operators": "trained", "site": "logits",
        "model": {"path": "/models/<tiny>", "parameters": 123456, "fingerprint": "abc123",
                  "reader": "layer 1"},
        "stage_seconds": {"operators": 12.5, "responses": 3.25, "solve": 0.5},
        "history": [{"step": s, "loss": 2.0 / (1 + s)} for s in range(0, 100, 10)]}))
    lines = (run / "topk.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    recs[0].update(estimator="ridge", cv_r2=0.01, weak_signal=True)
    recs[1].update(estimator="lasso", cv_r2=0.42, weak_signal=False)
    (run / "topk.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    page = write_report(run).read_text(encoding="utf-8")
    c = parse(page)
    check_self_contained(c, page)
    assert "/models/&lt;tiny&gt;" in page and "123,456" in page and "abc123" in page
    for stage in ("operators", "responses", "solve"):
        assert f"<td>{stage}</td>" in page
    assert "Operator-training loss curve" in page and 'aria-label="Operator training: loss"' in page
    q0 = page[page.index('id="q0"'):page.index('id="q1"')]
    q1 = page[page.index('id="q1"'):page.index('id="q2"')]
    assert "held-out R² 0.010" in q0 and "Weak signal" in q0
    assert "held-out R² 0.420" in q1 and "Weak signal" not in q1
    # Without run_info.json the page says what is missing instead of inventing it.
    (run / "run_info.json").unlink()
    assert "No run_info.json" in write_report(run).read_text(encoding="utf-8")
    # A damaged run_info.json is one line naming the file and the fix.
    (run / "run_info.json").write_text("{not json")
    with pytest.raises(Exception, match="run_info.json is not valid JSON.*delete it"):
        write_report(run)
