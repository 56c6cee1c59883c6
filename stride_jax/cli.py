"""The ``stride-jax`` command: thin subcommands mapping 1:1 onto library functions.

Configs are YAML files (see ``configs/``) plus dotted overrides, e.g.::

    stride-jax pretrain --config configs/pretrain_tiny.yaml --out runs/tiny optim.epochs=1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from stride_jax import __version__

log = logging.getLogger("stride_jax")

DEFAULT_RUN_DIR = Path("runs/demo")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config file (default: built-in)")
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
    print(f"held-out loss: {result.heldout_loss:.4f}   ({len(result.corpus.heldout)} rows)")
    print(f"sample:\n{result.sample}\n")
    if result.out_dir is not None:
        print(f"model saved to {result.out_dir} ({seconds:.0f} s)")


def cmd_pretrain(args) -> int:
    from stride_jax.recipes import PretrainConfig, pretrain
    cfg = _load(PretrainConfig, args)
    t0 = time.perf_counter()
    result = pretrain(cfg, args.out, progress=not args.quiet)
    _print_pretrain_summary(result, time.perf_counter() - t0)
    return 0


def cmd_demo(args) -> int:
    """Pretrain the bundled tiny model on the embedded Shakespeare corpus (reused when present)."""
    from stride_jax.config import config_fingerprint, load_config
    from stride_jax.recipes import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    model_dir = args.out / "model"
    stamp = model_dir / "recipe.fingerprint"
    if not args.force and stamp.is_file() and stamp.read_text().strip() == config_fingerprint(cfg):
        print(f"reusing the pretrained model in {model_dir} (pass --force to retrain)")
        from stride_jax.model.hf import from_hf
        import json
        hist = json.loads((model_dir / "history.json").read_text())
        from stride_jax.recipes import format_loss_curve
        print(format_loss_curve(hist["history"]))
        print(f"held-out loss: {hist['heldout_loss']:.4f}")
        from_hf(model_dir)  # proves the saved model loads
        return 0
    print(f"stride-jax {__version__} demo: pretraining the tiny model on the embedded corpus")
    t0 = time.perf_counter()
    result = pretrain(cfg, model_dir, progress=not args.quiet)
    from stride_jax.io.atomic import atomic_write_text
    atomic_write_text(stamp, config_fingerprint(cfg) + "\n")
    _print_pretrain_summary(result, time.perf_counter() - t0)
    return 0


def cmd_export_smollm2(args) -> int:
    from stride_jax.model.gguf import export_gguf_to_hf
    out = export_gguf_to_hf(args.gguf, args.out)
    print(f"wrote an HF directory to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stride-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stride-jax {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded default run (tiny model, Shakespeare corpus)")
    p.add_argument("--out", type=Path, default=DEFAULT_RUN_DIR, help="run directory")
    p.add_argument("--force", action="store_true", help="retrain even if a matching model exists")
    p.add_argument("--config", type=Path, default=None, help="pretraining config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="train a small LM from scratch and save it as an HF directory")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export-smollm2", help="write the bundled SmolLM2-135M GGUF as an HF directory")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the bundled one)")
    p.set_defaults(func=cmd_export_smollm2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from stride_jax.config import ConfigError
    from stride_jax.data import DataError
    from stride_jax.model.hf import HFConfigError, HFWeightsError
    from stride_jax.io import SafetensorsError
    try:
        return args.func(args)
    except (ConfigError, DataError, HFConfigError, HFWeightsError, SafetensorsError,
            FileNotFoundError) as e:
        # Expected user errors: one clear line, no traceback.
        print(f"stride-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
