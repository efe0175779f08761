"""The one `collage` command: thin subcommands over the library.

    collage train   train an s-CNN or a collage-CNN (or every shipped model: --preset all)
    collage eval    accuracy, FLOPs and latency of models; the shipped ones by default
    collage export  export a checkpoint to ONNX with a parity check
    collage info    what a checkpoint or ONNX file holds
    collage worker    serve one model over the Open Inference Protocol (KServe V2)
    collage frontend  the collage front end over running workers
    collage serve     workers and front end on this machine (or a config file's workers)
    collage loadgen   open-loop load against any V2 endpoint
    collage bench     every redundancy mode under the same stragglers, with a report and plots
    collage bench-serving  the serving figures: front-end overhead, sustained rate
    collage demo    the main job: a short comparison of redundancy modes on the shipped models

Errors we raise on purpose print one line and exit 2; anything else is a bug and shows a trace.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from collage_inference import __version__
from collage_inference.config import DEFAULT_MODELS_DIR, REPO_ROOT
from collage_inference.errors import CollageError, ConfigError
from collage_inference.modelspec import ModelConfig

DEFAULT_WIDTH = 32  # channels of an s-CNN's first stage

# Subcommands that are whole programs with their own flags; only their module is imported.
SERVICE_COMMANDS = {
    "worker": ("collage_inference.serving.worker", "serve one model over KServe V2"),
    "frontend": ("collage_inference.serving.api", "run the collage front end over running workers"),
    "serve": ("collage_inference.deploy.local", "start workers and front end on this machine"),
    "loadgen": ("collage_inference.bench.loadgen", "open-loop load against a V2 endpoint"),
    "bench": (
        "collage_inference.bench.compare",
        "every redundancy mode under the same stragglers: p99 ratios",
    ),
    "bench-serving": ("collage_inference.bench.serving", "front-end overhead and sustained-rate figures"),
    "bench-ray": ("collage_inference.bench.ray_overhead", "latency the Ray Serve backend adds, vs local"),
    "faults": ("collage_inference.bench.faults", "kills, hangs, garbage and overload under load: accounting"),
}


def shipped_checkpoints(models_dir: Path) -> list[Path]:
    """The shipped checkpoints in table order: the s-CNN first, then collages by grid."""
    found = sorted(models_dir.glob("*.pt"), key=lambda p: (not p.stem.startswith("scnn"), p.stem))
    found = [p for p in found if not p.name.endswith(".resume.pt")]
    if not found:
        raise ConfigError(f"no checkpoints (*.pt) in {models_dir}; train them with `make models`")
    return found


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from collage_inference.data import DATASET_KINDS

    p.add_argument("--dataset", default="fashion-mnist", choices=DATASET_KINDS, help="dataset kind")
    p.add_argument("--data-dir", type=Path, help="dataset folder (default for fashion-mnist: Debian's)")


def cmd_train(args: argparse.Namespace) -> int:
    from collage_inference.training.export import export_onnx
    from collage_inference.training.parity import ParityConfig, train_parity
    from collage_inference.training.train import train

    start = time.perf_counter()
    configs = _train_configs(args)
    for cfg in configs:
        result = train_parity(cfg) if isinstance(cfg, ParityConfig) else train(cfg)
        report = export_onnx(*_load(result.path), result.path.with_suffix(".onnx"))
        m, kind = result.meta.metrics, result.meta.kind
        score = (
            f"val degraded-mode accuracy {m['val_degraded_accuracy']:.4f}, reconstruction "
            f"{m['val_reconstruction']:.4f}" if kind == "parity" else f"val accuracy {m['val_accuracy']:.4f}"
        )  # fmt: skip
        unit = {"collage": "collages", "parity": "parity queries"}.get(kind, "images")
        print(
            f"{result.meta.name}: {score}, {m['gflops'] * 1e3:.1f} MFLOPs, {m['params']:,} params, "
            f"trained in {result.seconds / 60:.1f} min at {m['inputs_per_second']:.0f} {unit}/s -> "
            f"{result.path} (+ .onnx, max |logit diff| {report.max_abs_diff:.1e})"
        )
    if len(configs) > 1:
        print(f"trained {len(configs)} models in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _train_configs(args: argparse.Namespace) -> list:
    """What `collage train` was asked to train: presets, or one model described by flags."""
    from collage_inference.training.parity import ParityConfig
    from collage_inference.training.presets import preset, preset_names
    from collage_inference.training.train import TrainConfig

    overrides = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "seed": args.seed,
            "resume": args.resume,
            "train_limit": args.train_limit,
            "val_size": args.val_size,
            "progress": not args.quiet,
        }.items()
        if v is not None
    }
    if args.preset:
        return [preset(n, args.models_dir, **overrides) for n in preset_names(args.preset)]
    if args.out is None:
        raise ConfigError("give --out PATH.pt for the checkpoint (or use --preset)")
    extra = {"dataset": args.dataset, "data_dir": args.data_dir, "batch_size": args.batch_size, "lr": args.lr}
    extra = {k: v for k, v in extra.items() if v is not None}
    if args.kind == "parity":
        if args.scnn is None or overrides.pop("resume", False):
            raise ConfigError("--kind parity needs --scnn PATH.pt (the s-CNN it backs) and takes no --resume")
        return [ParityConfig(args.scnn, args.k, args.encoder, args.out, **extra, **overrides)]
    model, sizing = _model_config_from_args(args)
    if sizing:
        print(f"{args.out.stem}: {sizing}", file=sys.stderr)
    distill = {"teacher": args.scnn, "distill": args.distill} if args.distill else {}
    if args.temperature is not None:
        distill["temperature"] = args.temperature
    return [TrainConfig(model=model, out=args.out, sizing=sizing, **extra, **distill, **overrides)]


def _load(path: Path):
    from collage_inference.training.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _model_config_from_args(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """The architecture the flags describe, and how its size was chosen."""
    from collage_inference.data import load_dataset
    from collage_inference.training.models import resnet_config
    from collage_inference.training.sizing import Sizing, fit_to_budget, flops

    probe = load_dataset(args.dataset, "test", args.data_dir, args.image_size)
    size = args.image_size or probe.image_size
    d, norm = args.depth, {"mean": (0.5,) * probe.channels, "std": (0.25,) * probe.channels}
    if args.kind == "scnn":
        if args.scnn or args.distill:
            raise ConfigError("--scnn and --distill size and teach collage models; drop them for --kind scnn")
        if args.arch in ("resnet18", "resnet34"):
            return resnet_config(int(args.arch[6:]), probe.num_classes, probe.channels, size), ""
        w = args.width or DEFAULT_WIDTH
        scnn = ModelConfig("scnn", probe.num_classes, probe.channels, size, stem_width=w,
                           widths=(w, 2 * w, 4 * w), blocks=(d, d, d), **norm)  # fmt: skip
        return scnn, ""
    tile = args.tile_size or size
    strides = (2, 2, 2) if tile % 8 == 0 else (2, 2, 1) if tile % 4 == 0 else None
    if strides is None:
        raise ConfigError(f"--tile-size {tile} must be a multiple of 4")
    w = args.width or DEFAULT_WIDTH
    collage = ModelConfig("collage", probe.num_classes, probe.channels, tile, args.grid,
                          stem_width=max(w // 2, 8), widths=(w, 2 * w, 4 * w), blocks=(1, d, d),
                          strides=strides, **norm)  # fmt: skip
    if args.scnn:  # the s-CNN this model backs up sets the budget
        budget = flops(_load(args.scnn)[1].config)
    else:  # the s-CNN `collage train --kind scnn` builds for the same data
        budget = flops(ModelConfig("scnn", probe.num_classes, probe.channels, size, **norm))
    if args.width:
        sizing = Sizing(collage, flops(collage), budget, f"given by hand (--width {args.width})")
    else:
        sizing = fit_to_budget(collage, budget)
    return sizing.config, sizing.describe()


def cmd_eval(args: argparse.Namespace) -> int:
    from collage_inference.data import load_dataset
    from collage_inference.modelspec import ModelMeta
    from collage_inference.training.checkpoint import read_checkpoint
    from collage_inference.training.evaluate import (
        evaluate_model,
        machine_summary,
        render_table,
        scnn_logits,
        write_model_card,
    )

    paths = [Path(p) for p in (args.models or shipped_checkpoints(args.models_dir))]
    test = load_dataset(args.dataset, "test", args.data_dir)
    # the s-CNN among the models (or the shipped one) labels every image once, so that each collage
    # model's sure cells can be compared with it on the same images
    scnn = next((p for p in paths if ModelMeta.from_dict(read_checkpoint(p)["meta"]).kind == "scnn"), None)
    shipped = args.models_dir / "scnn.pt"
    scnn = scnn or (shipped if shipped.is_file() else None)
    outputs = scnn_logits(scnn, test) if scnn is not None else None
    scnn_labels = outputs.argmax(-1) if outputs is not None else None
    reports = []
    for path in paths:
        print(f"evaluating {path.name} ...", file=sys.stderr, flush=True)
        reports.append(evaluate_model(path, test, args.threads, args.latency_runs, scnn_labels, outputs))
    result = {
        "dataset": test.name,
        "split": "test",
        "threads": args.threads,
        "machine": machine_summary(),
        "models": [r.to_dict() for r in reports],
    }
    print(json.dumps(result, indent=2) if args.json else render_table(reports))
    if getattr(args, "write_card", False):
        readme = REPO_ROOT / "README.md"
        shipped = args.models_dir.resolve() == (REPO_ROOT / "models" / "fashion-mnist").resolve()
        write_model_card(args.models_dir, result, render_table(reports), (readme,) if shipped else ())
        print(f"recorded the figures in {args.models_dir}/eval.json and MODEL_CARD.md", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from collage_inference.training.export import export_onnx

    out = args.out or args.checkpoint.with_suffix(".onnx")
    report = export_onnx(*_load(args.checkpoint), out)
    print(f"{out}: max |logit diff| vs PyTorch {report.max_abs_diff:.2e}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from collage_inference.onnxfile import read_onnx_meta

    meta = read_onnx_meta(args.model) if args.model.suffix == ".onnx" else _load(args.model)[1]
    print(json.dumps(meta.to_dict(), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from collage_inference.bench.compare import default_out_dir
    from collage_inference.bench.demo import run_demo

    return run_demo(args.out or default_out_dir(), args.models_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"collage-inference {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (or the shipped ones with --preset all)")
    p.add_argument(
        "--preset",
        help="a shipped recipe (scnn, collage-2x2, collage-3x3, collage-4x4, parm-k2-concat, ...), "
        "all (the s-CNN and the collage models) or parm (the ParM parity models)",
    )
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="where presets write")
    p.add_argument("--kind", choices=("scnn", "collage", "parity"), default="scnn",
                   help="parity: a ParM parity model for --scnn (see --k and --encoder)")  # fmt: skip
    p.add_argument("--k", type=int, default=2, help="parity: images per parity query (2 or 4 for concat)")
    p.add_argument("--encoder", choices=("concat", "sum"), default="concat", help="parity: ParM's encoder")
    p.add_argument("--arch", choices=("small", "resnet18", "resnet34"), default="small", help="s-CNN shape")
    p.add_argument("--grid", type=int, default=3, help="collage side S (k = S*S cells)")
    p.add_argument("--tile-size", type=int, help="collage tile side in pixels (default: image size)")
    p.add_argument("--image-size", type=int, help="resize images to this side (imagefolder)")
    p.add_argument(
        "--width", type=int,
        help=f"channels of the first stage (s-CNN default {DEFAULT_WIDTH}; a collage model's default "
             "follows from its budget: one s-CNN pass of FLOPs per collage)",
    )  # fmt: skip
    p.add_argument(
        "--scnn", type=Path, metavar="PATH.pt",
        help="collage: the s-CNN it backs up (its FLOPs set the budget; --distill learns its soft labels)",
    )  # fmt: skip
    p.add_argument(
        "--distill", type=float, metavar="WEIGHT",
        help="collage: weight in [0, 1] of the --scnn model's soft labels in the loss (e.g. 0.5)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, help="distillation temperature (default 2)")
    p.add_argument("--depth", type=int, default=1, help="blocks per stage")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--train-limit", type=int, help="use N training images (a seeded sample, stratified by class)"
    )
    p.add_argument("--val-size", type=int, help="held-out training images (default: min(5000, 10%%))")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT.resume.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, help="checkpoint path (.pt); the .onnx goes beside it")
    _add_data_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate models")
    p.add_argument("models", nargs="*", type=Path, help="checkpoints (default: the shipped models)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument(
        "--write-card",
        action="store_true",
        help="also record the figures in MODELS_DIR/eval.json and MODEL_CARD.md",
    )
    _add_data_args(p)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    p.add_argument("--latency-runs", type=int, default=200, help="timed batch-1 runs per model")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the main job: a short redundancy comparison on the shipped models")
    p.add_argument("--out", type=Path, help="report folder (default runs/<timestamp>/)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a checkpoint to ONNX with a parity check")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="print what a .pt or .onnx model holds")
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_info)

    for name, (_, helptext) in SERVICE_COMMANDS.items():
        sub.add_parser(name, help=f"{helptext} (see `collage {name} --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SERVICE_COMMANDS:  # these own their flags
        module = importlib.import_module(SERVICE_COMMANDS[argv[0]][0])
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CollageError as exc:
        print(f"collage {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
