"""External peer: kronfluence's (EK-FAC) influence functions on the same model and rows as ours.

Runs `kronfluence <https://github.com/pomonam/kronfluence>`_ (PyTorch, CPU) on a Hugging Face
export of a stride-jax model (``stride_jax.model.hf.to_hf``) and on the same tokenized rows the
JAX pipeline uses, and returns scores in our format, so the LDS code scores both the same way::

    python benchmarks/peers_kronfluence.py --model runs/x/hf --rows rows.npz --out peer/scores.npy \
        [--strategy ekfac|kfac|identity|diagonal] [--damping 1e-3] [--workdir DIR]

``rows.npz`` holds int arrays ``train_input_ids, train_attention_mask, train_loss_mask`` ``[n, T]``
and ``query_input_ids, query_attention_mask, query_loss_mask`` ``[Q, T]`` (right padding; the
``loss_mask`` convention of ``stride_jax.data``: ``loss_mask[i, t] = 1`` iff position ``t``'s
prediction of token ``t + 1`` is scored, so the last column is 0).

Objectives (kronfluence's documented language-modelling convention, its ``examples/openwebtext``):

* training loss of a row (fitting the factors, train gradients): the SUM over scored positions of
  the next-token cross-entropy; with ``sample=True`` (the true Fisher, kronfluence's default
  ``use_empirical_fisher=False``) the targets at the scored positions are drawn from the model's own
  predictive distribution;
* query measurement: the query's MEAN next-token loss over its scored positions (nats per token,
  the quantity our scores are in). Summing train losses but averaging the measurement only rescales
  each query's row of scores by a positive constant, which LDS (a per-query rank correlation)
  ignores.

Sign: kronfluence's pairwise score is ``grad f_q^T (G + lambda I)^-1 grad L_i`` with NO minus sign
(``module/tracker/pairwise_score.py`` contracts the preconditioned query gradient with the train
gradient; nothing negates). Upweighting example ``i`` by ``eps`` moves the parameters by
``-eps H^-1 grad L_i`` and so changes the query loss by ``-eps * score``: a positive kronfluence
score means training on ``i`` LOWERS the query loss, which is exactly our convention
(``scores[q, i] > 0``: example ``i`` lowers query ``q``'s loss). So the scores are used unchanged.
``tests/test_peers.py`` pins this against autograd dot products (``strategy="identity"``).

Tracked modules: by default every ``nn.Linear`` inside the decoder blocks (attention q/k/v/o and
MLP gate/up/down), as in Grosse et al. (2023); ``modules="mlp"`` keeps only the MLPs and
``modules="all"`` adds the (possibly tied) ``lm_head``, whose ``vocab x vocab`` gradient covariance
is impractical for real vocabularies. Embeddings and norms are not ``nn.Linear`` and never tracked.

Needs the ``peers`` extra: ``pip install -c constraints.txt -e .[peers]`` (then
``pip uninstall -y torchvision`` if one was pulled in; ``scripts/setup.sh`` does it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = "pip install -c constraints.txt -e .[peers]"
STRATEGIES = ("ekfac", "kfac", "identity", "diagonal")
MODULE_SETS = ("blocks", "mlp", "all")
ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")


def _require():
    """Import torch and kronfluence, or fail with the install command."""
    try:
        import kronfluence  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the kronfluence peer needs kronfluence and the CPU torch: `{INSTALL_HINT}` "
            f"(then `pip uninstall -y torchvision` if one was pulled in) [{e}]") from e
    return torch, kronfluence


def load_rows(rows_npz: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read and check ``rows.npz``; returns ``(train, query)`` dicts of int64 ``[*, T]`` arrays."""
    with np.load(rows_npz) as z:
        missing = [f"{s}_{k}" for s in ("train", "query") for k in ROW_KEYS if f"{s}_{k}" not in z]
        if missing:
            raise KeyError(f"{rows_npz}: missing arrays {missing}")
        split = {s: {k: np.asarray(z[f"{s}_{k}"]).astype(np.int64) for k in ROW_KEYS}
                 for s in ("train", "query")}
    T = split["train"]["input_ids"].shape[1]
    for s, rows in split.items():
        shape = rows["input_ids"].shape
        if len(shape) != 2 or shape[1] != T or any(a.shape != shape for a in rows.values()):
            raise ValueError(f"{rows_npz}: {s} arrays must share one [rows, {T}] shape, got "
                             f"{ {k: a.shape for k, a in rows.items()} }")
        if rows["loss_mask"][:, -1].any():
            raise ValueError(f"{rows_npz}: {s}_loss_mask[:, -1] must be 0 (position t scores "
                             "token t + 1; the last position predicts nothing)")
        if (rows["loss_mask"] & (1 - rows["attention_mask"])).any():
            raise ValueError(f"{rows_npz}: {s}_loss_mask scores padded positions")
    return split["train"], split["query"]


def _tracked_module_names(model, modules: str) -> list[str]:
    from torch import nn

    if modules not in MODULE_SETS:
        raise ValueError(f"modules must be one of {MODULE_SETS}, got {modules!r}")
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        in_block = ".layers." in f".{name}."
        if modules == "all" or (modules == "blocks" and in_block) or (
                modules == "mlp" and in_block and ".mlp." in f".{name}."):
            names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear modules matched modules={modules!r}")
    return names


def _make_task(tracked: list[str]):
    torch, _ = _require()
    import torch.nn.functional as F
    from kronfluence.task import Task

    def _next_token_ce(batch, model, sample: bool):
        """Per-position CE ``[B, T-1]`` (zero where not scored) and the scored-mask ``[B, T-1]``."""
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
        mask = batch["loss_mask"][:, :-1].bool()
        targets = batch["input_ids"][:, 1:]
        if sample:  # true Fisher: labels drawn from the model's own predictive distribution
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                targets = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(
                    targets.shape)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none").view(targets.shape)
        return ce * mask, mask

    class NextTokenTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False):
            ce, _ = _next_token_ce(batch, model, sample)
            return ce.sum()  # summed over scored positions and rows (kronfluence's convention)

        def compute_measurement(self, batch, model):
            ce, mask = _next_token_ce(batch, model, sample=False)
            per_query = ce.sum(1) / mask.sum(1).clamp(min=1)  # mean nats per scored token
            return per_query.sum()  # per-sample gradients: each query's own mean loss

        def get_influence_tracked_modules(self):
            return list(tracked)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return NextTokenTask()


def _dataset(rows: dict[str, np.ndarray]):
    torch, _ = _require()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return int(tensors["input_ids"].shape[0])

        def __getitem__(self, i):
            return {k: v[i] for k, v in tensors.items()}

    return Rows()


def load_hf_model(hf_dir: str | Path):
    """The HF export on CPU in float32, eval mode."""
    torch, _ = _require()
    from transformers import AutoModelForCausalLM

    # transformers 5 spells it `dtype` (`torch_dtype` is its deprecated alias).
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.to("cpu").eval()


def run_kronfluence(hf_dir: str | Path, rows_npz: str | Path, *, strategy: str = "ekfac",
                    damping: float | None = None, train_batch: int = 16, query_batch: int = 16,
                    workdir: str | Path, modules: str = "blocks", seed: int = 0,
                    progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores ``[Q, n]`` float32 (our sign) and a dict of timings and settings."""
    torch, kronfluence = _require()
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    train, query = load_rows(rows_npz)
    n, Q = train["input_ids"].shape[0], query["input_ids"].shape[0]
    torch.manual_seed(seed)  # the sampled Fisher labels

    t0 = time.perf_counter()
    model = load_hf_model(hf_dir)
    tracked = _tracked_module_names(model, modules)
    by_name = dict(model.named_modules())
    tracked_params = int(sum(p.numel() for name in tracked for p in by_name[name].parameters()))
    task = _make_task(tracked)
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="kronfluence", model=model, task=task, cpu=True,
                        disable_tqdm=not progress, output_dir=str(workdir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    train_ds, query_ds = _dataset(train), _dataset(query)
    t_load = time.perf_counter() - t0

    with warnings.catch_warnings():
        # kronfluence 1.0.1 builds a (disabled) `torch.cuda.amp.GradScaler` on CPU; torch warns.
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler",
                                category=FutureWarning)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name=strategy, dataset=train_ds,
                                 per_device_batch_size=train_batch,
                                 factor_args=FactorArguments(strategy=strategy),
                                 overwrite_output_dir=True)
        t_fit = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = analyzer.compute_pairwise_scores(
            scores_name=f"{strategy}_pairwise", factors_name=strategy, query_dataset=query_ds,
            train_dataset=train_ds, per_device_query_batch_size=query_batch,
            per_device_train_batch_size=train_batch,
            score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        t_score = time.perf_counter() - t0
    if out is None:
        out = analyzer.load_pairwise_scores(scores_name=f"{strategy}_pairwise")
    # No sign flip: a positive kronfluence score already means training on i lowers the query's
    # loss (see the module docstring).
    scores = out["all_modules"].detach().to(torch.float32).cpu().numpy()
    if scores.shape != (Q, n):
        raise RuntimeError(f"kronfluence returned scores of shape {scores.shape}, "
                           f"expected {(Q, n)}")
    info = dict(
        peer="kronfluence", strategy=strategy, damping=damping, modules=modules,
        tracked_modules=len(tracked), tracked_params=tracked_params,
        n=int(n), Q=int(Q), T=int(train["input_ids"].shape[1]), train_batch=train_batch,
        query_batch=query_batch, seed=seed, load_s=round(t_load, 3), fit_factors_s=round(t_fit, 3),
        scores_s=round(t_score, 3), kronfluence=kronfluence.__version__,
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        python=platform.python_version(), sign="scores[q, i] > 0: training on i lowers query "
        "q's mean per-token loss (kronfluence's pairwise score, unchanged)")
    return scores, info


def ekfac_scores(hf_dir: str | Path, rows_npz: str | Path, *, strategy: str = "ekfac",
                 damping: float | None = None, train_batch: int = 16, query_batch: int = 16,
                 workdir: str | Path, **kwargs: Any) -> np.ndarray:
    """kronfluence influence scores ``[Q, n]`` float32 in our sign and format.

    ``scores[q, i] > 0`` means training example ``i`` lowers query ``q``'s (mean per-token) loss.
    ``damping=None`` is kronfluence's heuristic (0.1 x the mean eigenvalue, per module). Extra
    keywords go to :func:`run_kronfluence` (``modules``, ``seed``, ``progress``).
    """
    scores, _ = run_kronfluence(hf_dir, rows_npz, strategy=strategy, damping=damping,
                                train_batch=train_batch, query_batch=query_batch,
                                workdir=workdir, **kwargs)
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (stride_jax to_hf)")
    ap.add_argument("--rows", required=True, help="rows.npz (train_*/query_* arrays)")
    ap.add_argument("--out", required=True, help="scores.npy to write ([Q, n] float32)")
    ap.add_argument("--strategy", default="ekfac", choices=STRATEGIES)
    ap.add_argument("--damping", type=float, default=None,
                    help="damping factor (default: kronfluence's 0.1 x mean eigenvalue)")
    ap.add_argument("--modules", default="blocks", choices=MODULE_SETS)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--query-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--workdir", default=None,
                    help="kronfluence's output directory (default: OUT without suffix + "
                         "'.kronfluence/'; overwritten)")
    ap.add_argument("--progress", action="store_true", help="kronfluence's progress bars")
    args = ap.parse_args(argv)

    try:
        torch, _ = _require()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else out.with_suffix(".kronfluence")
    scores, info = run_kronfluence(
        args.model, args.rows, strategy=args.strategy, damping=args.damping,
        train_batch=args.train_batch, query_batch=args.query_batch, workdir=workdir,
        modules=args.modules, seed=args.seed, progress=args.progress)
    if not np.isfinite(scores).all():
        print(f"warning: {int((~np.isfinite(scores)).sum())} non-finite scores", file=sys.stderr)
    np.save(out, scores)
    info.update(model=str(args.model), rows=str(args.rows), workdir=str(workdir))
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"kronfluence {info['kronfluence']} ({args.strategy}, {info['tracked_modules']} modules, "
          f"{info['tracked_params']:,} params) n={info['n']} Q={info['Q']} T={info['T']}")
    print(f"fit factors: {info['fit_factors_s']:.2f} s   scores: {info['scores_s']:.2f} s   "
          f"(load {info['load_s']:.2f} s)")
    print(f"wrote {out} {scores.shape} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
