"""The ``stride-jax`` command: thin subcommands mapping 1:1 onto library functions.

Configs are YAML files (see ``configs/``) plus dotted overrides, e.g.::

    stride-jax pretrain --config configs/pretrain_tiny.yaml --out runs/tiny optim.epochs=1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from stride_jax import __version__

from stride_jax.errors import ConfigError

log = logging.getLogger("stride_jax")

DEFAULT_RUN_DIR = Path("runs/demo")


class _Parser(argparse.ArgumentParser):
    """argparse with our error contract: one line, ``<prog>: error: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> Path:
    """A path argument; an empty one would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; pass a file or directory name")
    return Path(text)


def _at_least(minimum: int):
    """An integer argument of at least ``minimum`` (argparse type)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{value} must be a positive count or fraction")
    return value


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} made with other arguments (every output of the earlier "
                        f"run is removed first)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=_path, default=None, help="YAML config file (default: built-in)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides applied on top of the config, e.g. optim.epochs=1")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")


def _load(cls, args):
    from stride_jax.config import format_config_help, load_config
    if args.help_config:
        print(format_config_help(cls))
        raise SystemExit(0)
    return load_config(cls, args.config, args.overrides)


def _print_pretrain_summary(result, seconds: float) -> None:
    from stride_jax.recipes import format_loss_curve
    n_params = result.model.config.num_params()
    print(f"\nloss curve ({len(result.corpus.train)} training rows, {n_params:,} parameters):")
    print(format_loss_curve(result.history))
    if len(result.corpus.heldout):
        print(f"held-out loss: {result.heldout_loss:.4f}   ({len(result.corpus.heldout)} rows)")
    else:
        print("held-out loss: none (corpus.heldout_fraction=0 holds out no rows)")
    print(f"sample:\n{result.sample}\n")
    if result.out_dir is not None:
        print(f"model saved to {result.out_dir} ({seconds:.0f} s)")


def _claim(args) -> None:
    """Check the output directory (``--out``) before any work and hold its lock until the
    command ends (:mod:`stride_jax.io.outdir`)."""
    from stride_jax.io.outdir import check_output_dir, lock_output_dir
    args.cleanup.enter_context(lock_output_dir(check_output_dir(args.out), args.command))


def cmd_pretrain(args) -> int:
    from stride_jax.recipes import PretrainConfig, pretrain
    cfg = _load(PretrainConfig, args)
    _claim(args)
    t0 = time.perf_counter()
    result = pretrain(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite)
    _print_pretrain_summary(result, time.perf_counter() - t0)
    return 0


def cmd_demo(args) -> int:
    """Pretrain the tiny model on the embedded corpus (reused when present), then attribute."""
    import json

    from stride_jax.attributor import AttributeConfig
    from stride_jax.config import load_config, to_dict
    from stride_jax.model.hf import from_hf
    from stride_jax.recipes import PretrainConfig, build_corpus, format_loss_curve, pretrain
    from stride_jax.recipes.pretrain import finished_pretrain

    cfg = load_config(PretrainConfig, args.config)
    att_cfg = load_config(AttributeConfig, args.attribute_config, args.overrides)
    _claim(args)
    model_dir = args.out / "model"
    print(f"stride-jax {__version__} demo: the tiny model on the embedded Shakespeare corpus")
    t0 = time.perf_counter()
    # Reused only when the model's own stamp says this recipe made it and its files are there.
    if not args.force and finished_pretrain(model_dir, cfg):
        print(f"reusing the pretrained model in {model_dir} (--force retrains)")
        hist = json.loads((model_dir / "history.json").read_text())
        print(format_loss_curve(hist["history"]))
        print(f"held-out loss: {hist['heldout_loss']:.4f}")
        model = from_hf(model_dir)
        corpus = build_corpus(cfg.corpus)
    else:
        print("1/2 pretraining")
        # The demo's own model directory: a model of another recipe is replaced.
        result = pretrain(cfg, model_dir, progress=not args.quiet, overwrite=True)
        _print_pretrain_summary(result, time.perf_counter() - t0)
        model, corpus = result.model, result.corpus
    queries = corpus.heldout.subset(range(min(args.queries, len(corpus.heldout))))
    print(f"2/2 attributing {len(queries)} held-out queries to {len(corpus.train)} training rows "
          f"(site={att_cfg.steering.site}, operators={att_cfg.operators})")
    t1 = time.perf_counter()
    _open_run(args.out / "attribution", att_cfg, overwrite=args.overwrite,
              inputs={"demo": {"recipe": to_dict(cfg), "queries": len(queries)}})
    result, train_texts, query_texts = _attribute_and_write(
        model, corpus.tokenizer, corpus.train, queries, att_cfg, args.out / "attribution",
        overwrite=args.overwrite, progress=not args.quiet, report=True, title="stride-jax demo",
        model_path=model_dir)
    print_attribution(result, train_texts, query_texts)
    page = args.out / "attribution" / "report.html"
    print(f"\nattribution took {time.perf_counter() - t1:.0f} s; scores and topk.jsonl are in "
          f"{args.out / 'attribution'} (total {time.perf_counter() - t0:.0f} s)")
    print(f"report (open in a browser): {page}")
    return 0


def _snippet(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def print_attribution(result, train_texts, query_texts, *, queries: int = 3, k: int = 3) -> None:
    for q in range(min(queries, len(result.query_ids))):
        pro, opp = result.top(q, k)
        print(f"\nquery {result.query_ids[q]}  (base loss {result.base_loss_q[q]:.3f})")
        print(f"  {_snippet(query_texts[q])}")
        print("  top proponents (training on them lowers this query's loss):")
        for i, s in pro or []:
            print(f"    {s:+.2e}  {result.train_ids[i]:<28} {_snippet(train_texts[i], 70)}")
        if not pro:
            print("    (none: no example has a positive score)")
        print("  top opponents (training on them raises it):")
        for i, s in opp or []:
            print(f"    {s:+.2e}  {result.train_ids[i]:<28} {_snippet(train_texts[i], 70)}")
        if not opp:
            print("    (none: no example has a negative score)")


def _open_run(out: Path, cfg, *, overwrite: bool, inputs: dict) -> None:
    """Stamp the run directory with everything its outputs depend on; other outputs there are
    refused, or with --overwrite removed, before any work (stride_jax.io.outdir)."""
    from stride_jax.attribution import RUN_ARTIFACTS, SELF_STAMPED
    from stride_jax.config import to_dict
    from stride_jax.io.outdir import open_output_dir
    open_output_dir(out, "attribute", {**inputs, "config": to_dict(cfg)}, overwrite=overwrite,
                    artifacts=RUN_ARTIFACTS, keep=SELF_STAMPED)


def _attribute_and_write(model, tokenizer, train_rows, query_rows, cfg, out: Path, *,
                         overwrite: bool, progress: bool, self_influence: bool = False,
                         report: bool = False, title: str | None = None,
                         model_path: Path | None = None):
    import numpy as np

    from stride_jax.attributor import Attributor
    from stride_jax.io.outdir import complete_output_dir
    from stride_jax.tokenizer import row_texts
    att = Attributor(model, train_rows, cfg, workdir=out, overwrite=overwrite, progress=progress)
    result = att.attribute(query_rows)
    att.write(result, query_rows, out, tokenizer=tokenizer, self_influence=self_influence,
              report=report, title=title, model_path=model_path)
    train_texts, query_texts = row_texts(train_rows, tokenizer), row_texts(query_rows, tokenizer)
    if self_influence:
        score = att.self_influence()   # computed by write, kept in memory
        print("most memorised training rows (self-influence, nats/token):")
        for i in np.argsort(-score)[:3]:
            print(f"  {score[i]:+.3f}  {train_rows.ids[i]:<28} {_snippet(train_texts[i], 70)}")
    complete_output_dir(out)
    return result, train_texts, query_texts


def _plan_memory(cfg, model, train_rows, query_rows, budget):
    """Print each stage's estimated peak memory and fit the result-neutral chunks to the budget
    (``auto``: the memory available now, so a run the plan accepts is not killed for memory;
    ``none``: no budget)."""
    import jax
    from flax import nnx

    from stride_jax.parallel import make_mesh
    from stride_jax.parallel.memory import Shapes, available_memory, plan_memory
    from stride_jax.steering import resolve_layer
    c = model.config
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    layer = resolve_layer(cfg.steering, c.num_layers)
    mesh = make_mesh(cfg.parallel)
    shapes = Shapes(n=len(train_rows), seq_len=train_rows.seq_len, num_queries=len(query_rows),
                    d_reader=c.hidden_size, d_final=c.hidden_size, vocab=c.vocab_size,
                    params_bytes=params_bytes, upper_layers=c.num_layers - layer - 1)
    host, device, unified = available_memory()
    if budget is None or str(budget).lower() == "auto":
        budget, device_budget = host, device
    elif str(budget).lower() == "none":
        budget = device_budget = None
    else:
        device_budget = None
    plan = plan_memory(cfg, shapes, budget=budget, device_budget=device_budget,
                       devices=1 if mesh is None else mesh.size, unified=unified)
    print("estimated peak memory per stage (stride_jax.parallel.memory):")
    print(plan.format())
    return plan.config


def _join_processes(parallel, args) -> None:
    """Multi-host (parallel.distributed): join the runtime before JAX does any work; the other
    processes stay quiet (no progress bars, warnings only) while process 0 reports and writes."""
    from stride_jax.parallel import initialize, is_writer
    if initialize(parallel) and not is_writer():
        import os
        import sys
        logging.getLogger().setLevel(logging.WARNING)
        args.quiet = True
        sys.stdout = open(os.devnull, "w")   # the summary is printed once, by process 0


# Rows of text cut into chunks (data.train_mode=chunk) when data.seq_len is null.
CHUNK_LEN = 256


def cmd_attribute(args) -> int:
    import hashlib

    from stride_jax.attributor import AttributeConfig, check_run, rows_fingerprint
    from stride_jax.data import (
        DataError,
        iter_documents,
        load_tokenized,
        longest_row,
        pad_columns,
        read_documents,
        source_stamp,
        tokenize_documents,
        tokenize_to_disk,
    )
    from stride_jax.model.hf import from_hf
    from stride_jax.parallel import process_dir
    from stride_jax.parallel.memory import parse_bytes
    from stride_jax.data import detect_format
    from stride_jax.tokenizer import (as_backend, check_model_tokenizer, check_vocab_matches,
                                      load_tokenizer, special_ids, tokenizer_fingerprint,
                                      vocab_size_of)

    if args.method is not None:
        args.overrides = [*args.overrides, f"method={args.method}"]
    cfg = _load(AttributeConfig, args)
    spec = _check_method(cfg, args)
    _join_processes(cfg.parallel, args)
    _claim(args)
    model = from_hf(args.model, strict=not args.no_strict_config)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    check_vocab_matches(tokenizer, model.config.vocab_size)
    if args.tokenizer is not None:
        check_model_tokenizer(tokenizer, args.model, source=str(args.tokenizer),
                              force=args.force_tokenizer)
    context = model.config.max_position_embeddings
    if cfg.data.seq_len is not None and cfg.data.seq_len > context:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context "
                          f"({context} tokens); set data.seq_len to at most {context} (or null)")
    fmt = cfg.data.format
    mode = cfg.data.train_mode
    if mode == "auto":   # by content, not by the file name
        mode = "document" if detect_format(args.train, format=fmt) == "jsonl" else "chunk"
    # data.seq_len null: rows as long as the longest document (training and queries, rounded
    # up to a multiple of 16, at most the context), so 60-token documents are not padded to the
    # context; text cut into chunks keeps a fixed length.
    fit = cfg.data.seq_len is None
    seq_len = cfg.data.seq_len or (min(context, CHUNK_LEN) if mode == "chunk" else context)
    filler = special_ids(tokenizer).filler_id
    # What a CLI user can change when a document does not fit (the library's own hint names
    # Python arguments): queries are always whole documents.
    longer = (f", or raise data.seq_len up to the model's context ({context} tokens)"
              if cfg.data.seq_len is not None and cfg.data.seq_len < context else "")
    too_long_fix = f"set data.train_mode=chunk to cut the documents of {args.train}{longer}"
    # The queries first: a bad query file fails before the training data is tokenized.
    query_rows = tokenize_documents(
        read_documents(args.queries, format=fmt), tokenizer, cfg.data.seq_len or context,
        mode="document", fit=fit,
        too_long_fix=f"shorten that query in {args.queries} (queries are never cut){longer}")
    threshold = parse_bytes(cfg.data.stream_threshold)
    source = source_stamp(args.train)
    _open_run(args.out, cfg, overwrite=args.overwrite, inputs={
        "model": str(args.model.resolve()), "tokenizer": tokenizer_fingerprint(tokenizer),
        "train": {"path": str(args.train.resolve()), "size": source["size"]},
        "queries": rows_fingerprint(query_rows), "memory_budget": args.memory_budget,
        "self_influence": args.self_influence, "method": spec.text})
    stream = cfg.data.stream
    if stream == "auto":
        stream = "on" if source["size"] > threshold else "off"
    if stream == "on":
        # Rows larger than memory live memory-mapped in the run directory; a rerun reuses them
        # while everything that shapes them is unchanged (the source by size and mtime, the
        # tokenizer by the hash of its serialisation).
        # Every host tokenizes its own copy (per-host loading).
        tokens_dir = process_dir(args.out / "tokens" / "train")
        meta = {**source, "vocab_size": vocab_size_of(tokenizer),
                "seq_len": f"fit<={seq_len}" if fit and mode == "document" else seq_len,
                "mode": mode, "format": fmt, "tokenizer": hashlib.sha256(
                    as_backend(tokenizer).to_str().encode()).hexdigest()[:16]}
        try:
            train_rows = load_tokenized(tokens_dir, meta=meta)
            print(f"reusing the tokenized training rows in {tokens_dir}")
        except DataError:   # missing, interrupted, or made from other inputs: rebuild
            print(f"tokenizing {args.train} in chunks into {tokens_dir}")
            if fit and mode == "document":   # one pass for the length, one for the rows
                seq_len = max(query_rows.seq_len, longest_row(
                    iter_documents(args.train, format=fmt), tokenizer, seq_len))
            train_rows = tokenize_to_disk(iter_documents(args.train, format=fmt), tokenizer,
                                          seq_len,
                                          tokens_dir, mode=mode, too_long_fix=too_long_fix,
                                          meta=meta)
    else:
        train_rows = tokenize_documents(read_documents(args.train, format=fmt), tokenizer,
                                        seq_len, mode=mode, too_long_fix=too_long_fix,
                                        fit=fit and mode == "document")
        train_rows = pad_columns(train_rows, max(train_rows.seq_len, query_rows.seq_len), filler)
    # One row length for both sets where it costs nothing (each pass then compiles once).
    query_rows = pad_columns(query_rows, max(train_rows.seq_len, query_rows.seq_len), filler)
    how = ("data.seq_len" if not fit else "data.seq_len null: the longest document, rounded up"
           if mode == "document" else f"data.seq_len null: text cut into chunks of "
                                      f"min(context, {CHUNK_LEN})")
    lengths = (f"{train_rows.seq_len}" if train_rows.seq_len == query_rows.seq_len
               else f"{train_rows.seq_len} (queries: {query_rows.seq_len})")
    print(f"{len(train_rows)} training rows and {len(query_rows)} queries of {lengths} tokens "
          f"({how})")
    if spec.name != "stride":     # every other method and mixtures: stride_jax.methods
        return _attribute_method(cfg, spec, model, tokenizer, train_rows, query_rows, args)
    check_run(cfg, len(train_rows))   # settings that depend on n, before any work on them
    cfg = _plan_memory(cfg, model, train_rows, query_rows, args.memory_budget)
    result, train_texts, query_texts = _attribute_and_write(
        model, tokenizer, train_rows, query_rows, cfg, args.out, overwrite=args.overwrite,
        progress=not args.quiet, self_influence=args.self_influence,
        model_path=args.model.resolve())
    print_attribution(result, train_texts, query_texts)
    print(f"\nscores ({len(query_rows)} x {len(train_rows)}) and topk.jsonl written to {args.out}")
    return 0


def _check_method(cfg, args):
    """The parsed ``--method`` (the config checked it on load) and the options only STRIDE has."""
    from stride_jax.methods import parse_method
    spec = parse_method(cfg.method)
    if spec.name != "stride" and args.self_influence:
        raise ConfigError(f"--self-influence uses STRIDE's operators; drop it or use --method "
                          f"stride (method is {spec.text})")
    return spec


def _attribute_method(cfg, spec, model, tokenizer, train_rows, query_rows, args) -> int:
    """``attribute --method M`` for M other than stride: the registry's stamped stages
    (:mod:`stride_jax.methods`), the same output files as STRIDE's."""
    from stride_jax import methods
    from stride_jax.attributor import check_run
    from stride_jax.errors import DataError
    from stride_jax.attribution import write_run_info
    from stride_jax.io.outdir import complete_output_dir
    from stride_jax.tokenizer import row_texts
    if "stride" in spec.methods:
        check_run(cfg, len(train_rows))
        cfg = _plan_memory(cfg, model, train_rows, query_rows, args.memory_budget)
    elif len(train_rows) < 1:
        raise DataError(f"{args.train} holds no training rows: nothing to attribute to")
    plan = methods.plan_memory(cfg, model, n=len(train_rows), num_queries=len(query_rows),
                               seq_len=train_rows.seq_len, budget=args.memory_budget)
    print(f"estimated peak memory of {spec.text} (stride_jax.methods.plan_memory):")
    print(plan.format())
    t0 = time.perf_counter()
    result = methods.attribute(model, train_rows, query_rows, plan.config, workdir=args.out,
                               overwrite=args.overwrite, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    train_texts, query_texts = row_texts(train_rows, tokenizer), row_texts(query_rows, tokenizer)
    result.write(args.out, train_texts=train_texts, query_texts=query_texts, k=cfg.topk)
    write_run_info(args.out, {"method": spec.text, "model": _model_identity(model, args.model),
                              "training_rows": len(train_rows),
                              "stage_seconds": {"attribute": round(seconds, 3)}, "history": []})
    complete_output_dir(args.out)
    print_attribution(result, train_texts, query_texts)
    print(f"\n{spec.text} scores ({len(query_rows)} x {len(train_rows)}) and topk.jsonl written "
          f"to {args.out}")
    return 0


def _model_identity(model, path: Path) -> dict:
    """A stride-jax CausalLM's identity for ``run_info.json``: path, parameters, fingerprint."""
    import jax
    from flax import nnx

    from stride_jax.steering import params_fingerprint
    params = nnx.state(model, nnx.Param)
    return {"path": str(Path(path).resolve()),
            "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
            "fingerprint": params_fingerprint(params), "num_layers": model.config.num_layers,
            "vocab_size": model.config.vocab_size}


def _write_ids(path: Path, task) -> None:
    from stride_jax.attribution import write_ids
    write_ids(path, task.queries.ids, task.train.ids)


def cmd_groundtruth(args) -> int:
    from stride_jax.config import dump_config
    from stride_jax.eval.groundtruth import run_groundtruth
    from stride_jax.eval.suite import TaskConfig, build_task

    cfg = _load(TaskConfig, args)
    _claim(args)
    print(f"building the {cfg.kind} task (training its model)")
    t0 = time.perf_counter()
    task = build_task(cfg)
    print(f"  {task.n} training examples, {task.num_queries} queries "
          f"({time.perf_counter() - t0:.0f} s)")
    gt = run_groundtruth(task.retrain, n=task.n, num_queries=task.num_queries, cfg=cfg.groundtruth,
                         out_dir=args.out, stamp=task.stamp, overwrite=args.overwrite,
                         progress=not args.quiet)
    _write_ids(args.out / "ids.json", task)
    dump_config(cfg, args.out / "task.yaml")
    spread = float(gt.losses_sq.std(0).mean())
    print(f"ground truth: {gt.losses_sq.shape[0]} retrains x {task.num_queries} query losses in "
          f"{args.out} (retrained now: {gt.info.get('retrained', 0)}, mean loss spread over "
          f"subsets {spread:.4f})")
    return 0


def cmd_score(args) -> int:
    from stride_jax.config import to_dict
    from stride_jax.eval.suite import TaskConfig, build_task, run_method
    from stride_jax.io.atomic import save_npy, write_json
    from stride_jax.io.outdir import complete_output_dir, open_output_dir
    from stride_jax.methods import parse_method

    cfg = _load(TaskConfig, args)
    parse_method(args.method)      # an unknown method fails before the task is built
    _claim(args)
    # Stamped stages (STRIDE's in stride/, EK-FAC's factors and each other method's scores in
    # stages/) check their own stamps: a rerun reuses them.
    open_output_dir(args.out, "score", {"method": args.method, "config": to_dict(cfg)},
                    overwrite=args.overwrite, artifacts=("scores.npy", "ids.json", "timing.json",
                                                         "stride", "stages"),
                    keep=("stride", "stages"))
    task = build_task(cfg)
    stages = args.out / ("stride" if args.method == "stride" else "stages")
    res = run_method(args.method, task, cfg, workdir=stages, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    save_npy(args.out / "scores.npy", res.scores_qn)
    _write_ids(args.out / "ids.json", task)
    write_json(args.out / "timing.json", {"method": args.method, "task": cfg.kind,
                                          "seconds": res.seconds, **res.info})
    complete_output_dir(args.out)
    print(f"{args.method} on {cfg.kind}: scores {res.scores_qn.shape} in {res.seconds:.1f} s -> "
          f"{args.out / 'scores.npy'}")
    return 0


_SCORES_HINT = "pass the scores.npy written by `stride-jax attribute` or `stride-jax score`"


def _dense_scores(path: Path):
    """The ``[queries, train]`` scores of ``--scores`` (a scores file or its run directory)."""
    from stride_jax.attribution import Attribution
    from stride_jax.errors import DataError
    result = Attribution.load(path, hint=_SCORES_HINT)
    if result.scores_qn is None:
        raise DataError(f"{path} holds only each query's top scores (scores=topk); this needs "
                        f"every score: rerun the attribution with scores=dense")
    return result


def cmd_evaluate(args) -> int:
    from stride_jax.attribution import IDS, read_ids
    from stride_jax.errors import DataError
    from stride_jax.eval.groundtruth import load_groundtruth
    from stride_jax.eval.metrics import lds
    from stride_jax.io.atomic import write_json

    _check_json_out(args, "lds.json")
    run = _dense_scores(args.scores)
    scores = run.scores_qn
    gt = load_groundtruth(args.groundtruth)
    S, n = gt.masks_sn.shape
    Q = gt.losses_sq.shape[1]
    if scores.shape != (Q, n):
        raise DataError(f"{args.scores} holds scores of shape {scores.shape} but the ground "
                        f"truth in {args.groundtruth} is over {Q} queries x {n} training "
                        f"examples: score the same queries and training set (same order)")
    ids_g = args.groundtruth / IDS
    if run.query_ids is not None and ids_g.is_file():
        for part, ours, theirs in zip(("queries", "train"), (run.query_ids, run.train_ids),
                                      read_ids(ids_g, hint="rerun `stride-jax groundtruth`")):
            if ours != theirs:
                raise DataError(f"the {part} ids next to {args.scores} differ from those of the "
                                f"ground truth ({ids_g}): the scores are for other data or "
                                f"another order")
    result = lds(scores, gt.masks_sn, gt.losses_sq, bootstrap=args.bootstrap)
    print(result.format())
    if args.json is not None:
        write_json(args.json, {"scores": str(args.scores), "groundtruth": str(args.groundtruth),
                               "lds": result.to_dict()}, indent=1)
    return 0


def _check_json_out(args, example: str) -> None:
    from stride_jax.io.outdir import check_output_file
    if args.json is not None:
        check_output_file(args.json, flag="--json", example=example)


def cmd_counterfactual(args) -> int:
    import numpy as np

    from stride_jax.eval.metrics import counterfactual_summary
    from stride_jax.eval.suite import TaskConfig, build_task, counterfactual
    from stride_jax.io.atomic import write_json

    cfg = _load(TaskConfig, args)
    _check_json_out(args, "counterfactual.json")
    scores = _dense_scores(args.scores).scores_qn
    task = build_task(cfg)
    if scores.shape != (task.num_queries, task.n):
        raise ConfigError(f"{args.scores} has shape {scores.shape}; the {cfg.kind} task has "
                          f"{task.num_queries} queries x {task.n} training examples")
    k = int(args.k) if args.k >= 1 else max(1, int(round(args.k * task.n)))
    queries = np.arange(min(args.queries, task.num_queries))
    got = counterfactual(task, scores, k=k, queries=queries, num_random=args.random)
    summary = counterfactual_summary(got["base"], got["top"], got["random"])
    print(f"removing each query's top-{k} examples raises its loss by "
          f"{summary['mean_increase_top']:.4f} on average; removing {k} random examples by "
          f"{summary['mean_increase_random']:.4f} ({len(queries)} queries, difference "
          f"{summary['mean_difference']:.4f}, 95% CI {summary['difference_ci_low']:.4f} .. "
          f"{summary['difference_ci_high']:.4f})")
    if args.json is not None:
        write_json(args.json, {"k": k, **summary}, indent=1, default=float)
    return 0


def cmd_export_smollm2(args) -> int:
    from stride_jax.io.outdir import complete_output_dir, open_output_dir
    from stride_jax.model.gguf import export_gguf_to_hf
    from stride_jax.model.hf import HF_MODEL_FILES
    _claim(args)
    open_output_dir(args.out, "export-smollm2",
                    {"gguf": None if args.gguf is None else str(args.gguf.resolve())},
                    overwrite=args.overwrite, artifacts=HF_MODEL_FILES)
    out = export_gguf_to_hf(args.gguf, args.out)
    complete_output_dir(out)
    print(f"wrote an HF directory to {out}")
    return 0


def cmd_report(args) -> int:
    """One self-contained HTML page per run (stride_jax.apps.report)."""
    from stride_jax.apps.report import write_report
    print(write_report(args.run_dir, args.out, lds_results=args.lds, title=args.title,
                       max_queries=args.max_queries))
    return 0


def cmd_select(args) -> int:
    """Top-k pool examples by aggregate influence on a run's queries (stride_jax.apps.select)."""
    from stride_jax.apps.select import select_run
    from stride_jax.attribution import read_estimators
    recs, path = select_run(args.run, args.k, how=args.aggregate, out=args.out)
    with_text = sum("text" in r for r in recs)
    made_by = read_estimators(args.run) if Path(args.run).is_dir() else []
    by = f" ({'/'.join(made_by).replace('_', ' ')} scores)" if made_by else ""
    print(f"selected {len(recs)} examples{by} by {args.aggregate} aggregate -> {path} "
          f"({with_text} with text from topk.jsonl)")
    for r in recs[:5]:
        print(f"  {r['rank']:>4}  {r['value']:+.3f}  {r['id']:<28} "
              f"{_snippet(r.get('text', ''), 60)}")
    if len(recs) > 5:
        print(f"  ... {len(recs) - 5} more")
    return 0


def cmd_contamination(args) -> int:
    """Contamination audit (stride_jax.tasks.contamination): planted replicas of queries."""
    from stride_jax.config import dump_config, to_dict
    from stride_jax.io.atomic import write_json
    from stride_jax.io.outdir import complete_output_dir, open_output_dir
    from stride_jax.tasks.contamination import ContaminationConfig, run_audit

    cfg = _load(ContaminationConfig, args)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()]
               if args.methods else None)
    _claim(args)
    open_output_dir(args.out, "contamination", {"config": to_dict(cfg), "methods": methods},
                    overwrite=args.overwrite, keep=("stride",),
                    artifacts=("contamination.json", "contamination.yaml", "scores", "stride"))
    out = run_audit(cfg, methods, workdir=args.out, progress=not args.quiet)
    print(out["table"])
    ref = out["reference"]["query_loss"]
    print(f"reference (no attribution): detection by the query's own loss: ROC-AUC "
          f"{ref['roc_auc']:.3f}, PR-AUC {ref['pr_auc']:.3f}")
    dump_config(cfg, args.out / "contamination.yaml")
    write_json(args.out / "contamination.json", out, indent=1, default=float)
    complete_output_dir(args.out)
    print(f"results written to {args.out / 'contamination.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stride-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stride-jax {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded default run (tiny model, Shakespeare corpus)")
    p.add_argument("--out", type=_path, default=DEFAULT_RUN_DIR, help="run directory")
    p.add_argument("--force", action="store_true", help="retrain even if a matching model exists")
    p.add_argument("--config", type=_path, default=None, help="pretraining config (YAML)")
    p.add_argument("--attribute-config", type=_path, default=None, help="attribution config (YAML)")
    p.add_argument("--queries", type=_at_least(1), default=8, help="held-out rows to attribute")
    p.add_argument("--overwrite", action="store_true",
                   help="replace attribution artifacts made with other arguments")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the attribution config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="train a small LM from scratch and save it as an HF directory")
    p.add_argument("--out", type=_path, required=True, help="output model directory")
    _add_overwrite(p, "a model")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("attribute", help="STRIDE attribution of queries to training examples")
    p.add_argument("--model", type=_path, required=True, help="HF model directory")
    p.add_argument("--train", type=_path, required=True,
                   help="training data: JSON Lines ({id, text} or {id, prompt, completion}; "
                        "recognised by content, whatever the file is called), a text file or a "
                        "directory of .txt files")
    p.add_argument("--queries", type=_path, required=True, help="queries (JSON Lines)")
    p.add_argument("--out", type=_path, required=True, help="run directory")
    p.add_argument("--tokenizer", type=_path, default=None,
                   help="tokenizer.json or its directory (default: the model directory's); it "
                        "must be the model's own")
    p.add_argument("--force-tokenizer", action="store_true",
                   help="use --tokenizer even though it differs from the model's own "
                        "tokenizer (a warning instead of an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace stage artifacts made with other arguments")
    p.add_argument("--no-strict-config", action="store_true",
                   help="warn instead of failing on HF config keys stride-jax does not know")
    p.add_argument("--memory-budget", default="auto", metavar="SIZE",
                   help="e.g. 24GiB: lower the result-neutral chunk sizes (closed_form."
                        "batch_size, measure.query_batch, measure.subset_chunk, solve."
                        "query_chunk) until every stage's estimated peak fits, or refuse before "
                        "any work naming the stage; on a CPU the budget covers host and devices "
                        "together. auto (default): the memory available now (and each GPU's "
                        "own); none: no limit. The plan is printed either way")
    p.add_argument("--self-influence", action="store_true",
                   help="also score every training row's memorisation (selfinf.json; costs "
                        "about 2d/K of measuring every row as a query)")
    p.add_argument("--method", default=None, metavar="M",
                   help="stride (default), ekfac, kfac, trak, logra, tracin, graddot, if, bm25, "
                        "repsim, or a mixture of per-query z-scores such as "
                        "mix:stride=0.25,ekfac=0.75 (mix: the default mixture); settings in the "
                        "config's methods.* keys (stride_jax.methods)")
    _add_config_args(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("groundtruth", help="build an evaluation task and retrain it on random "
                                           "subsets (resumable)")
    p.add_argument("--out", type=_path, required=True, help="ground-truth directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a ground truth made with other arguments")
    _add_config_args(p)
    p.set_defaults(func=cmd_groundtruth)

    p = sub.add_parser("score", help="scores of one method (stride or a baseline) on a task")
    p.add_argument("--method", required=True,
                   help="stride, ekfac, kfac, influence (if), trak, logra, tracin, graddot, "
                        "repsim, bm25, or a mixture mix:stride=0.25,ekfac=0.75 (mix: the default)")
    p.add_argument("--out", type=_path, required=True, help="output directory (scores.npy)")
    _add_overwrite(p, "scores")
    _add_config_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="Linear Datamodeling Score of a scores file")
    p.add_argument("--scores", type=_path, required=True, help="scores.npy [queries, train]")
    p.add_argument("--groundtruth", type=_path, required=True, help="ground-truth directory")
    p.add_argument("--bootstrap", type=_at_least(0), default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--json", type=_path, default=None, help="also write the result as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("counterfactual", help="retrain without each query's top-k examples "
                                              "and without k random ones")
    p.add_argument("--scores", type=_path, required=True, help="scores.npy of the task's queries")
    p.add_argument("--k", type=_positive_number, default=0.05,
                   help="examples removed: a count (>= 1) or a fraction of n (< 1)")
    p.add_argument("--queries", type=_at_least(1), default=20, help="first queries evaluated")
    p.add_argument("--random", type=_at_least(1), default=4, help="random removals to average")
    p.add_argument("--json", type=_path, default=None, help="also write the summary as JSON")
    _add_config_args(p)
    p.set_defaults(func=cmd_counterfactual)

    p = sub.add_parser("export-smollm2", help="write the bundled SmolLM2-135M GGUF as an HF directory")
    p.add_argument("--out", type=_path, required=True, help="output model directory")
    p.add_argument("--gguf", type=_path, default=None, help="GGUF file (default: the bundled one)")
    _add_overwrite(p, "a model")
    p.set_defaults(func=cmd_export_smollm2)

    p = sub.add_parser("report", help="one self-contained HTML page of an attribution run")
    p.add_argument("run_dir", type=_path, metavar="RUN_DIR",
                   help="the --out directory of `stride-jax attribute` (the demo's: "
                        "runs/demo/attribution)")
    p.add_argument("--out", type=_path, default=None,
                   help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--lds", type=_path, default=None,
                   help="LDS benchmark results (e.g. benchmarks/results/lds.json) for an "
                        "LDS-vs-wall-time plot")
    p.add_argument("--max-queries", type=_at_least(1), default=None, help="show only the first N queries")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("contamination", help="contamination audit: leak queries into the training "
                                             "data, train, attribute, find the replicas")
    p.add_argument("--out", type=_path, required=True,
                   help="output directory (contamination.json, scores/, stride/)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: the config's methods), e.g. "
                        "stride,repsim,graddot,trak,logra,bm25")
    _add_overwrite(p, "audit results")
    _add_config_args(p)
    p.set_defaults(func=cmd_contamination)

    p = sub.add_parser("select", help="keep the top-k training examples by aggregate influence "
                                      "on a run's queries (data selection)")
    p.add_argument("--run", type=_path, required=True, metavar="RUN_DIR",
                   help="the --out directory of `stride-jax attribute` (scores.npy, ids.json): "
                        "its --train is the candidate pool, its --queries the targets")
    p.add_argument("--k", type=int, required=True, help="examples to keep (1 .. pool size)")
    p.add_argument("--aggregate", choices=("zscore", "mean", "rank"), default="zscore",
                   help="how per-query scores are combined: zscore (each query standardised, "
                        "default), mean, or rank (mean per-query rank)")
    p.add_argument("--out", type=_path, default=None,
                   help="JSONL file to write (default: RUN_DIR/selected.jsonl)")
    p.set_defaults(func=cmd_select)
    return parser


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
    """Keep XLA executables on disk, so a rerun (or a resumed run) skips recompilation.

    ``directory`` defaults to ``$STRIDE_JAX_CACHE`` or ``~/.cache/stride-jax/xla``; set
    ``STRIDE_JAX_CACHE=off`` to disable. A cache chosen by the user through JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` is left alone.
    """
    import os

    import jax
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    env = os.environ.get("STRIDE_JAX_CACHE", "")
    if env.lower() == "off":
        return None
    path = Path(directory or env or Path.home() / ".cache" / "stride-jax" / "xla")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home must not stop a run
        log.warning("no XLA compilation cache (%s)", e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Our small models compile in well under JAX's default 1 s threshold, yet add up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # orbax logs routine async-save timing through absl at WARNING level.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from stride_jax.errors import StrideError
    args.cleanup = contextlib.ExitStack()   # what a command holds until it ends (its lock)
    try:
        with args.cleanup:
            return args.func(args)
    except (StrideError, FileNotFoundError, PermissionError) as e:
        # Our errors name the problem and the fix, and a missing or unreadable path names
        # itself: one clear line; -v shows the traceback. Anything else is a bug in stride-jax
        # and keeps its traceback (OSErrors aside, below).
        if args.verbose:
            raise
        print(f"stride-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Every stage and checkpoint is written atomically: nothing finished is lost.
        if args.verbose:
            raise
        where = f" {e}" if str(e) else ""
        again = ("to resume (finished stages and checkpoints are kept)" if args.command in
                 ("attribute", "demo", "groundtruth", "score", "contamination") else
                 "to start again")
        print(f"stride-jax {args.command}: interrupted{where}; rerun the same command {again}",
              file=sys.stderr)
        return 130
    except OSError as e:
        # A path we did not foresee (permissions, a file where a directory is needed, ...).
        if args.verbose:
            raise
        print(f"stride-jax {args.command}: error: {e}; check the paths given and their "
              f"permissions (-v shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
