"""The README's main command, `stride-jax demo`, end to end on a tiny configuration: pretrain,
attribute, print three queries with their proponents and opponents, write the HTML report; a
rerun reuses the model and every finished stage."""

from __future__ import annotations

from stride_jax.cli import main
from stride_jax.config import dump_config
from _tiny import TINY

SMALL = ["design.num_subsets=40", "design.per_example=4", "train.epochs=2",
         "train.subsets_per_step=40", "steering.rank=4"]


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    dump_config(TINY, tmp_path / "tiny.yaml")
    args = ["-q", "demo", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "tiny.yaml"),
            "--queries", "4", *SMALL]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1/2 pretraining" in out and "2/2 attributing 4 held-out queries" in out
    assert out.count("top proponents") == 3 and out.count("top opponents") == 3
    report = tmp_path / "run" / "attribution" / "report.html"
    assert f"report (open in a browser): {report}" in out
    assert report.stat().st_size > 1000
    for name in ("scores.npy", "topk.jsonl", "tokens.json", "ids.json", "attribute.yaml"):
        assert (tmp_path / "run" / "attribution" / name).is_file(), name
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "reusing the pretrained model" in again and "1/2 pretraining" not in again
