"""Smoke test of benchmarks/scaling.py: two --quick configurations (in-memory and on-disk cache),
each in its own subprocess; the JSON holds every stage's time and peak memory for both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"
STAGES = ("design", "cache", "train", "operators_io", "measure", "solve")


def test_scaling_quick_writes_every_stage(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sweep", "n", "--n", "256", "--out", str(out),
         "--workdir", str(tmp_path / "runs"), "--compile-cache", str(tmp_path / "xla"),
         "--no-plot", "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["quick"] is True
    results = doc["results"]
    assert {(r["spec"]["location"], r["spec"]["dtype"]) for r in results} == {
        ("memory", "float32"), ("disk", "bfloat16")}
    for r in results:
        assert r["status"] == "ok", r.get("status")
        assert r["scores_finite"]
        for s in STAGES:
            st = r["stages"][s]
            assert st["seconds"] > 0 and st["peak_rss"] > 0 and st["peak_anon"] > 0, (s, st)
            assert not st.get("running")
            assert r["plan"]["stages"].get(s if s != "operators_io" else "train")
        row = r["summary"]
        assert row["total_s"] == sum(r["stages"][s]["seconds"] for s in STAGES)
        assert row["train_steps"] == 1 and row["peak_rss_gib"] > 0
        assert (row["disk_cache_gib"] is not None) == (r["spec"]["location"] == "disk")
    assert "time per stage" in proc.stdout and "peak memory" in proc.stdout
    # the run directories are removed (the on-disk cache with them)
    assert not any((tmp_path / "runs").glob("n-*"))
