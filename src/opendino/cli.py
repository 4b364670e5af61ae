"""The ``opendino`` command line: ``opendino <command> ...``.

Exit codes: 0 success, 2 bad usage or configuration (the message names the bad value and the valid
choices), 1 runtime failure. ``OPENDINO_DEBUG=1`` prints tracebacks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import yaml


class UsageError(ValueError):
    """Bad arguments or configuration: exit code 2."""


def _model_and_norm(source: str, weights: str | None):
    from opendino import runs
    from opendino.models import MODELS, load_model
    from opendino.models.registry import UnknownModelError, normalisation

    if source not in MODELS and not Path(source).exists():
        raise UnknownModelError(f"{source!r} is neither a file nor a known model; known: {', '.join(MODELS)}")
    if weights is None and runs.is_run(source):  # a run folder: the model it exported
        source = str(Path(source) / runs.EXPORT)
    model = load_model(source, weights=weights)
    return model, normalisation(model)


def cmd_models(args: argparse.Namespace) -> int:
    from opendino.models import MODELS, build_model

    print(f"{'name':<18} {'params':>14}  {'official checkpoint file':<56} summary")
    for name, spec in MODELS.items():
        n = sum(p.numel() for p in build_model(name, device="meta").parameters())
        print(f"{name:<18} {n:>14,}  {spec.checkpoint or '-':<56} {spec.summary}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from opendino.data.sources import list_images
    from opendino.eval.features import OUTPUT_FORMATS, extract_features, save_features

    out = Path(args.out)
    if out.suffix not in OUTPUT_FORMATS:
        raise UsageError(f"--out {out}: unknown format {out.suffix!r}; valid: {', '.join(OUTPUT_FORMATS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; valid: cpu")
    model, (mean, std) = _model_and_norm(args.model, args.weights)
    if args.resolution % model.feature_stride:
        raise UsageError(
            f"--resolution {args.resolution} is not a multiple of the model's stride {model.feature_stride}"
        )
    try:
        paths = list_images(args.images)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if not paths:
        raise RuntimeError(f"{args.images}: no images found (extensions: jpg, png, webp, bmp, tiff)")
    if args.weights is None and not Path(args.model).exists():
        print(f"note: {args.model} has random weights (pass --weights FILE for trained ones)", file=sys.stderr)
    feats = extract_features(
        model,
        paths,
        mean=mean,
        std=std,
        resolution=args.resolution,
        resize=args.resize,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        num_workers=args.workers,
        keep_patch=not args.no_patch,
        compile=args.compile,
    )
    meta = {"model": args.model, "weights": args.weights, "resolution": args.resolution, "resize": args.resize}
    written = save_features(feats, out, meta)
    for path in feats.skipped:
        print(f"skipped unreadable image: {path}", file=sys.stderr)
    print(
        f"{len(feats.paths)} images ({len(feats.skipped)} skipped) -> {', '.join(map(str, written))}; "
        f"cls {tuple(feats.cls.shape)}, patch {tuple(feats.patch.shape) if feats.patch is not None else '-'}; "
        f"{feats.images_per_second:.1f} images/s"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from opendino.models import load_model, save_model
    from opendino.models.convert import CONVERTERS, hf_config

    model = load_model(args.source)
    out = Path(args.out)
    if args.to == "official" and out.suffix == ".safetensors":
        save_model(model, out)
    else:
        state = CONVERTERS[args.to]({k: v.detach().clone() for k, v in model.state_dict().items()})
        if args.to == "hf":
            out.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
            (out / "config.json").write_text(json.dumps(hf_config(model.model_kwargs), indent=2))
        elif out.suffix == ".safetensors":
            save_file(state, str(out))
        elif out.suffix in (".pth", ".pt"):
            torch.save(state, out)
        else:
            raise UsageError(f"--out {out}: use .safetensors or .pth (a folder for --to hf)")
    print(f"{args.source} -> {out} ({args.to} layout)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from opendino.deploy.onnx import ExportError, export_source

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: give a .onnx file")
    try:
        written = export_source(
            args.model,
            out,
            weights=args.weights,
            resolution=args.resolution,
            dynamic=args.dynamic,
            dtype=args.dtype,
            check=args.check,
            say=lambda line: print(line, file=sys.stderr),
        )
    except ExportError as e:
        raise UsageError(str(e)) from None
    for item in written:
        print(item)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from opendino.data.synthetic import write_image_folder

    if args.n < 1 or args.size < 16:
        raise UsageError(f"--n {args.n} / --size {args.size}: need n >= 1 and size >= 16")
    root = write_image_folder(args.out, n=args.n, size=args.size, split=args.split, seed=args.seed, pairs=args.pairs)
    print(f"wrote {args.n} {args.size}x{args.size} scenes with dense labels to {root}/<class>/ (docs/data.md)")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from opendino.data.sources import IMAGE_EXTENSIONS, open_source
    from opendino.data.stats import channel_stats, format_report, low_range_warning

    if args.channels < 1 or args.max_images < 1:
        raise UsageError(f"--channels {args.channels} / --max-images {args.max_images}: need both >= 1")
    try:
        source = open_source(args.path)
    except (FileNotFoundError, ValueError) as e:  # ValueError: not a source (a ConfigError is one too)
        raise UsageError(str(e)) from None
    if not len(source):
        raise UsageError(f"{args.path}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    source.set_channels(args.channels)
    stats = channel_stats(source, args.max_images, args.seed)
    if not stats.images:
        path, reason = stats.skipped[0]
        raise UsageError(
            f"{args.path}: none of the {len(stats.skipped)} images read decodes to {args.channels} channels "
            f"(--channels); first: {path} ({reason})"
        )
    print(format_report(stats))
    if stats.low_range:
        print(low_range_warning(stats), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _train_config(args: argparse.Namespace):
    """The run configuration of ``CONFIG [overrides]``; a bad key or value is a usage error (exit 2)."""
    from opendino.config import ConfigError
    from opendino.train.config import load_train_config

    try:
        return load_train_config(args.config, args.overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from opendino import runs
    from opendino.train.distributed import exit_finished_rank
    from opendino.train.trainer import Trainer

    cfg = _train_config(args)
    trainer = Trainer(cfg)
    run_dir = trainer.run()
    if trainer.env.is_main:
        folders = [run_dir / s["name"] for s in cfg.distill.students] or [run_dir]
        for folder in folders:
            print(f"finished: {folder} (model: {folder / runs.EXPORT}, metrics: {folder / runs.METRICS})")
    if trainer.env.world_size > 1:
        exit_finished_rank(0)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from opendino.config import to_dict
    from opendino.train.config import reference_markdown

    if args.reference:
        print(reference_markdown())
        return 0
    print(yaml.safe_dump(to_dict(_train_config(args)), sort_keys=False), end="")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    try:
        from opendino.train.submit import submit
    except ImportError:
        raise UsageError("opendino submit needs submitit: pip install 'opendino[slurm]'") from None
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise UsageError(f"--nodes {args.nodes} / --gpus-per-node {args.gpus_per_node}: need nodes >= 1, gpus >= 0")
    run_dir = Path(cfg.run.dir).resolve()
    # The job may start in another working directory: its run folder is absolute.
    overrides = [*args.overrides, f"run.dir={run_dir}"]
    job = submit(
        args.config,
        overrides,
        run_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        cluster=args.cluster,
    )
    print(f"submitted job {job.job_id}: {run_dir} (logs: {run_dir / 'submitit' / str(job.job_id)})")
    if args.wait:
        job.result()
        print(f"finished: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from opendino.eval.suite import TASKS, evaluate
    from opendino.eval.text import TEMPLATES

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks {args.tasks}: unknown {unknown}; valid: {','.join(TASKS)}")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder; give DIR (with train/ and val/) or synthetic")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; valid: cpu")
    if args.classnames is not None and not Path(args.classnames).is_file():
        raise UsageError(f"--classnames {args.classnames}: not a file (one class name per line)")
    if args.templates is not None and args.templates not in TEMPLATES and not Path(args.templates).is_file():
        valid = ", ".join(TEMPLATES)
        raise UsageError(f"--templates {args.templates}: valid: {valid}, or a file of templates with {{}}")
    if not Path(args.model).exists():
        from opendino.models import MODELS

        if args.model not in MODELS:
            raise UsageError(f"{args.model!r} is neither a run folder, a checkpoint file nor a known model")
    from opendino.eval.suite import PIXELS
    from opendino.models import MODELS

    for baseline in args.baseline or ():
        if baseline != PIXELS and baseline not in MODELS and not Path(baseline).exists():
            raise UsageError(
                f"--baseline {baseline}: neither {PIXELS}, a run folder, a checkpoint file nor a known model"
            )
    results = evaluate(
        args.model,
        data=args.data,
        tasks=tasks,
        out=args.out,
        resolution=args.resolution,
        n_train=args.n_train,
        n_val=args.n_val,
        device=args.device,
        batch_size=args.batch_size,
        classnames=args.classnames,
        templates=args.templates,
        baselines=args.baseline or (),
        compile=args.compile,
    )
    from opendino.eval.report import SETTINGS, baseline_labels, chance, difference

    labels = baseline_labels(results)  # one column per baseline, then one trained-<baseline> per baseline
    widths = {k: max(9, len(label)) for k, label in labels.items()}
    diff_widths = {k: max(15, len(label) + 8) for k, label in labels.items()}
    head = "".join(f" {labels[k]:>{widths[k]}}" for k in labels)
    head_diffs = "".join(f" {'trained-' + labels[k]:>{diff_widths[k]}}" for k in labels)
    print(f"\n{'task':<9} {'metric':<17} {'trained':>9} {'random init':>12}{head} {'chance':>8}{head_diffs}")
    for task in tasks:
        row = results["trained"][task]
        for metric, value in row.items():
            if isinstance(value, float) and metric not in SETTINGS and not metric.startswith("chance_"):
                level = chance(row, metric)
                shown = "" if level is None else f"{level:.4f}"
                cells, diffs = "", ""
                for k in labels:
                    other = results[k][task].get(metric)
                    d = difference(value, other, metric)
                    cells += f" {'skipped' if other is None else f'{other:.4f}':>{widths[k]}}"
                    diffs += f" {'-' if d is None else f'{d[0]:+.4f} {d[1]}':>{diff_widths[k]}}"
                line = f"{task:<9} {metric:<17} {value:>9.4f} {results['random_init'][task][metric]:>12.4f}{cells}"
                print(f"{line} {shown:>8}{diffs}")
        if "skipped" in row:
            print(f"{task:<9} skipped: {row['skipped']}")
    for k in labels:
        about = results["meta"]["baseline_info"][k]
        print(f"{labels[k]}: {about['source']}" + ("" if k != PIXELS else " (the resized raw pixels: the floor)"))
    print(f"\nreport: {results['meta']['report']}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from opendino.data.sources import NoImagesError, decode_or_skip, list_images
    from opendino.eval.features import eval_transform
    from opendino.eval.suite import resolve_model
    from opendino.eval.visualize import Row, patch_grid, save_figure, sheet, shown_input
    from opendino.models.registry import input_channels

    model, info = resolve_model(args.model)
    res = args.resolution or info["resolution"]
    if res % model.feature_stride:
        raise UsageError(f"--resolution {res} is not a multiple of the model's stride {model.feature_stride}")
    try:
        paths = list_images(args.images)
    except (FileNotFoundError, NoImagesError) as e:
        raise UsageError(str(e)) from None
    point = None
    if args.patch:
        try:
            point = tuple(int(v) for v in args.patch.split(","))
        except ValueError:
            raise UsageError(f"--patch {args.patch}: give ROW,COL of the patch grid") from None
    view = None
    if args.view:
        try:
            view = tuple(int(v) for v in args.view.split(","))
        except ValueError:
            raise UsageError(f"--view {args.view}: give R,G,B channel indices, e.g. 3,2,1") from None
    channels = input_channels(model)
    if view is not None and (len(view) != 3 or any(not 0 <= c < channels for c in view)):
        raise UsageError(f"--view {args.view}: give 3 indices of the model's {channels} input channels")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transform = eval_transform(res, info["mean"], info["std"])
    written: set[str] = set()
    label = Path(args.model).name if Path(args.model).exists() else f"{args.model} (random weights)"
    for path in paths:
        image = decode_or_skip(path, channels, say=lambda why: print(f"skipped: {why}", file=sys.stderr))
        if image is None:
            print(f"skipped (unreadable or of another channel count): {path}", file=sys.stderr)
            continue
        name = Path(path).stem  # images of the same name in different folders: both kept
        name = name if name not in written else f"{name}_{len(written)}"
        written.add(name)
        row = Row(label, shown_input(image, res, view), patch_grid(model, image, transform, res), point)
        save_figure(sheet([row], f"{Path(path).name}, {res} px", args.foreground), out / f"{name}.png")
    print(f"wrote {len(written)} pictures (input | PCA | similarity) to {out}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    import logging

    from opendino.view.server import FeatureViewer, ViewerError, ViewerLimits, serve

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; valid: cpu")
    if args.images is not None and not Path(args.images).exists():
        raise UsageError(f"--images {args.images}: no such file or folder")
    limits = ViewerLimits(
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_pixels=int(args.max_megapixels * 1e6),
        max_resolution=args.max_resolution,
    )
    try:
        limits.check()
        viewer = FeatureViewer.from_source(
            args.model,
            args.weights,
            say=lambda line: print(line, file=sys.stderr),
            resolution=args.resolution,
            images=args.images,
            limits=limits,
            device=args.device,
        )
    except (ViewerError, ValueError) as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} lets other machines reach the viewer", file=sys.stderr)
    if viewer.text_model is not None:
        print("text-aligned run: type words on the page for per-patch text similarity", file=sys.stderr)
    serve(viewer, args.host, args.port, say=lambda line: print(line, flush=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from opendino.demo import run_demo

    run_demo(Path(args.out))
    return 0


def _int_list(text: str | None) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise UsageError(f"{text!r}: give comma-separated integers, e.g. 1000,100,10") from None


def cmd_curate(args: argparse.Namespace) -> int:
    from opendino.config import ConfigError
    from opendino.curate import CurateConfig, run_curation
    from opendino.train.distributed import close_distributed, exit_finished_rank

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; valid: cpu")
    config = CurateConfig(
        pool=args.pool,
        out=args.out,
        size=args.size,
        backbone=args.backbone,
        levels=_int_list(args.levels),
        steps=_int_list(args.steps),
        sample_sizes=_int_list(args.sample_sizes),
        iterations=args.iterations,
        strategy=args.strategy,
        multiplier=args.multiplier,
        dedup=args.dedup,
        dedup_k=args.dedup_k,
        dedup_on=args.dedup_on,
        seed_set=args.seed_set,
        per_seed=args.per_seed,
        mix=args.mix,
        homogeneous=args.homogeneous,
        resolution=args.resolution,
        chunk=args.chunk,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        resume=args.resume,
    )
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        config.check()
        if distributed:  # torchrun: a gloo group carries the k-means sums (small, on the CPU)
            # The other ranks wait while rank 0 alone deduplicates and samples: far longer than gloo's default
            # 30-minute timeout on a large pool.
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=2))
            if args.device.startswith("cuda"):
                config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        counts = run_curation(config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if distributed:  # every rank waits for rank 0's stages, then leaves without interpreter teardown
        rank = torch.distributed.get_rank()
        close_distributed()
        if rank:
            exit_finished_rank(0)
    if "selection" in counts:
        print(
            f"pool {counts['pool']} -> {counts['embedded']} embedded ({counts['unreadable']} unreadable) -> "
            f"{counts['kept']} after dedup ({counts['exact']} exact, {counts['near']} near) -> "
            f"{counts['clustered']} clustered + {counts['retrieved']} retrieved -> {counts['selection']} in "
            f"{Path(args.out) / 'selection.txt'}; report: {Path(args.out) / 'report.md'}"
        )
    if distributed:
        exit_finished_rank(0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opendino",
        description="OpenDINO: train, distil, evaluate and use DINOv3-style models. "
        + " ".join(__doc__.split("\n\n")[1].split()).replace("``", "`"),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the named architectures and their official checkpoint files")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "extract",
        help="images -> CLS, pooled and patch-grid features",
        description="Extract features of a folder, an image list (.txt/.csv) or one image. MODEL is a named "
        "architecture (see `opendino models`; add --weights) or a checkpoint file (official .pth, OpenDINO or "
        "timm .safetensors, or a Hugging Face model folder).",
    )
    p.add_argument("model", help="model name or checkpoint file")
    p.add_argument("images", help="image folder (recursive), .txt/.csv list, or image file")
    p.add_argument("--out", required=True, help="output: .safetensors, .npz, or .npy (one file per array)")
    p.add_argument("--weights", help="checkpoint for a named MODEL (loaded strictly, weights_only)")
    p.add_argument("--resolution", type=int, default=224, help="input size in pixels (multiple of the stride)")
    p.add_argument("--resize", choices=("square", "crop"), default="square", help="square resize or centre crop")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes for decoding")
    p.add_argument("--no-patch", action="store_true", help="skip the patch-grid features")
    p.add_argument(
        "--compile", action="store_true", help="run the model through torch.compile (minutes to compile on a CPU)"
    )
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "convert",
        help="convert weights between the official, timm and Hugging Face layouts",
        description="SOURCE: any checkpoint OpenDINO reads (layout detected from the keys). --to official "
        "writes .safetensors (with the architecture in its metadata) or .pth; --to timm writes a state dict "
        "for timm's `vit_*_patch16_dinov3_qkvb` models; --to hf writes a folder (model.safetensors + "
        "config.json) for transformers' DINOv3ViTModel.",
    )
    p.add_argument("source")
    p.add_argument("--to", choices=("official", "timm", "hf"), required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export",
        help="export a backbone (and a text-aligned model's towers) to ONNX, checked against PyTorch",
        description="Writes OUT.onnx: images [batch, C, H, W] (normalised as the model expects) -> cls [batch, D], "
        "storage [batch, R, D] and patch [batch, h*w, D] tokens, RoPE included. With --dynamic the batch and "
        "the image size are free (H and W multiples of the stride); without, both are fixed at --resolution "
        "and batch 1. A text-aligned run also gives OUT.image.onnx (images -> image embedding, patch "
        "embeddings) and OUT.text.onnx (token ids [batch, context] -> text embedding; tokenise in Python). "
        "MODEL: run folder, checkpoint file, or a named architecture (random weights, with a warning).",
    )
    p.add_argument("model", help="run folder, checkpoint file or registered name")
    p.add_argument("--to", choices=("onnx",), default="onnx", help="the format (default: %(default)s)")
    p.add_argument("--out", required=True, help="the .onnx file")
    p.add_argument("--weights", help="checkpoint for a named MODEL (loaded strictly, weights_only)")
    p.add_argument("--resolution", type=int, default=224, help="example input size (default: %(default)s)")
    p.add_argument("--dynamic", action="store_true", help="free batch size and image size")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and inputs (default: fp32)")
    p.add_argument(
        "--check",
        action="store_true",
        help="run the file in onnxruntime and compare with PyTorch (at --resolution and, with --dynamic, at a "
        "second size and batch); fails when the largest difference exceeds 1e-4 (fp32) or 1e-2 (fp16)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser(
        "synth", help="write synthetic scenes with dense labels as an image folder (<split>/<class>/*.png)"
    )
    q.add_argument("--out", required=True, help="the folder to write (<out>/<split>/<class>/...)")
    q.add_argument("--n", type=int, default=256, help="number of scenes (default: %(default)s)")
    q.add_argument("--size", type=int, default=128, help="image side in pixels, 16 or more (default: %(default)s)")
    q.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="train",
        help="splits never share scenes (default: %(default)s)",
    )
    q.add_argument("--seed", type=int, default=0, help="the world's seed: scenes follow from (seed, split, index)")
    q.add_argument("--pairs", action="store_true", help="also a second view and its correspondences")
    q.set_defaults(func=cmd_data)
    q = data_sub.add_parser(
        "stats",
        help="per-channel mean and std of a data set, as crops.mean / crops.std overrides",
        description="Read up to --max-images images of PATH (a seeded random subset when it holds more), "
        "decoded as training decodes them (8 bits per channel, --channels channels; docs/data.md, Images with "
        "more or fewer than three channels), and print per channel the mean and standard deviation of pixel / "
        "255 over every pixel read (what crops.mean and crops.std take), the lowest and highest 8-bit level, "
        "the number of images read and skipped (unreadable, or with another channel count), the range of "
        "image sizes, and a ready-to-paste override line `crops.mean=[...] crops.std=[...]` (with "
        "`model.in_chans=N` when --channels is not 3). Formats: every image PIL reads, .npy / .npz arrays "
        "and TIFFs with any number of channels; values of more than 8 bits are mapped to 8 bits by one rule per "
        "image (uint16 above 255: divided by 65535), and a warning says so when a channel spans at most "
        "1/8 of the 8-bit range (e.g. 12-bit data stored as 16-bit) or is constant. Exit code 2 when PATH "
        "holds no image that decodes to --channels channels.",
    )
    q.add_argument("path", help="anything data.path takes: a folder, a .txt/.csv/.tsv list, .tar shards, a mix .yaml")
    q.add_argument(
        "--channels",
        type=int,
        default=3,
        help="channels to decode every image to (the model's model.in_chans); a one-channel image is repeated "
        "into RGB for 3, other counts are skipped (default: %(default)s, RGB)",
    )
    q.add_argument("--max-images", type=int, default=2000, help="read at most this many images (default: %(default)s)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random subset (default: %(default)s)")
    q.add_argument("--json", metavar="FILE", help="also write the statistics to FILE as JSON")
    q.set_defaults(func=cmd_data_stats)

    p = sub.add_parser(
        "train",
        help="pretrain (or continue) a model with the SSL recipe",
        description="Run the student-teacher recipe from a YAML preset (configs/demo, configs/stages, ...) with "
        "dotted overrides, e.g. `opendino train configs/demo/pretrain.yaml run.dir=runs/x train.steps=100 "
        "data.path=/my/images`. A folder with checkpoints resumes where it stopped. `distill.teacher=RUN` distils "
        "a trained run into this student (configs/distill). On several devices: `torchrun --nproc-per-node N -m "
        "opendino train ...` (docs/distributed.md).",
    )
    p.add_argument("config", help="YAML preset")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides (run.dir, data.path, model.arch, train.steps, ...)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "config",
        help="print the resolved configuration of a preset with overrides, or the reference of every key",
        description="Prints the configuration `opendino train CONFIG [overrides]` would run with (YAML), or "
        "with --reference the Markdown reference of every key (docs/configuration.md).",
    )
    p.add_argument("config", nargs="?", help="YAML preset (default: the official defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--reference", action="store_true", help="every key, its type, default and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "submit",
        help="run `opendino train` as a SLURM job (submitit), requeued and resumed on preemption",
        description="Submits a training run to SLURM through submitit: one task per GPU on each node, the "
        "torch.distributed environment taken from SLURM's. On preemption or time-out the job is requeued and "
        "resumes from its last checkpoint. Example: `opendino submit --nodes 2 --gpus-per-node 8 --partition "
        "learn configs/stages/pretrain.yaml run.dir=/checkpoint/me/vitl data.path=/datasets/images`.",
    )
    p.add_argument("config", help="YAML preset")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `opendino train`")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="also the number of tasks per node")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node (at least 1)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="data-loading workers live here")
    p.add_argument("--time", type=int, default=60 * 24, help="minutes per job before it is requeued")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm", help="local: processes on this machine")
    p.add_argument("--wait", action="store_true", help="block until the run has finished")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "eval",
        help="k-NN, linear, logistic regression, dense segmentation, depth, correspondence (and zero-shot, "
        "retrieval, open-vocabulary segmentation of text runs) vs random init",
        description="Evaluates a run folder (its teacher), a checkpoint file or a registered model beside a "
        "random-initialised model of the same architecture. Writes results.json, report.md, results.png and "
        "pictures.png into RUN/eval (or --out). Features are cached in float16 under <out>/cache. The text "
        "tasks (zeroshot, retrieval, ovseg) need a run of the text recipe (text.safetensors beside "
        "teacher.safetensors); their random init keeps the backbone and re-initialises the vision head and "
        "text tower.",
    )
    p.add_argument("model", help="run folder, checkpoint file or registered name")
    p.add_argument("--data", default="synthetic", help="synthetic, or DIR with train/<class>/ and val/<class>/")
    p.add_argument(
        "--tasks",
        default="knn,linear,logreg,seg,depth,corr",
        help="comma-separated subset of knn, linear, logreg, seg, depth, corr, and for a text run zeroshot, "
        "retrieval, ovseg (default: the six image tasks)",
    )
    p.add_argument(
        "--classnames",
        default=None,
        help="text tasks: a file with one class name per line, in the sorted order of the class folders "
        "(default: the folder names; _ becomes a space)",
    )
    p.add_argument(
        "--templates",
        default=None,
        help="text tasks: simple, synthetic, or a file with one prompt template per line containing {} "
        "(default: synthetic for --data synthetic, else simple)",
    )
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the run's global crop)")
    p.add_argument("--n-train", type=int, default=1000, help="synthetic training scenes (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=500, help="synthetic validation scenes (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument(
        "--baseline",
        action="append",
        default=None,
        metavar="MODEL|pixels",
        help="also evaluate this model (run folder, checkpoint file or registered name; its own normalisation) "
        "or the raw pixels at the same resolution through the same probes, with the difference trained - "
        "baseline of every metric; repeatable",
    )
    p.add_argument("--compile", action="store_true", help="extract features through torch.compile (same values)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "visualize",
        help="PCA and similarity pictures of patch features",
        description="For each image: the input, the PCA of its patch features as RGB and the cosine similarity "
        "of every patch to one patch, side by side, as PNG.",
    )
    p.add_argument("model", help="run folder, checkpoint file or registered name")
    p.add_argument("images", help="an image or a folder")
    p.add_argument("--out", default="pictures", help="the folder of the pictures (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--patch", default=None, help="ROW,COL of the reference patch (default: the centre)")
    p.add_argument("--foreground", action="store_true", help="PCA of the foreground patches only")
    p.add_argument(
        "--view",
        default=None,
        help="R,G,B: the image channels shown as red, green and blue, counted from 0 (images of more or fewer "
        "than 3 channels; default: the first three, the only one as grey, or of two 0,1,0)",
    )
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser(
        "curate",
        help="curate an image pool: embed, deduplicate, hierarchical k-means, balanced sampling, retrieval, mix",
        description="Turns an unlabelled pool (a folder, a .txt/.csv list or tar shards) into a training list: "
        "embeds it with --backbone, removes exact copies (and near-duplicates with --dedup), clusters it with "
        "a hierarchical k-means and samples the tree in a balanced way to --size images, retrieves the "
        "--per-seed nearest images of every --seed-set image, and writes OUT/selection.txt (train with "
        "`data.path=OUT/selection.txt`), OUT/mix.yaml and OUT/report.md. Every stage is resumable (--resume; a "
        "kill loses at most the chunk being embedded or the k-means step being run). Under torchrun each "
        "rank embeds a share of the pool and holds a share of the k-means points (docs/curation.md).",
    )
    p.add_argument("pool", help="image folder, .txt/.csv list, or tar shards (file, folder or glob)")
    p.add_argument("--out", required=True, help="the curation folder")
    p.add_argument("--size", type=int, default=0, help="images the balanced sampling picks (0: only retrieval)")
    p.add_argument("--backbone", help="run folder, checkpoint file or model name (a name alone: random weights)")
    p.add_argument("--levels", help="clusters per level, decreasing, e.g. 1000,100,10 (default: about n/16, /8, /8)")
    p.add_argument(
        "--steps", help="k-means runs per level (default: 1 at level 1; 10 above, or 1 where the sample size is 1)"
    )
    p.add_argument("--sample-sizes", help="resampling: points per cluster per level (default: half the mean size)")
    p.add_argument("--iterations", type=int, default=50, help="Lloyd updates per k-means (default: %(default)s)")
    p.add_argument("--strategy", choices=("random", "closest"), default="random", help="leaf picks (default: random)")
    p.add_argument("--multiplier", type=int, default=1, help="the most times one image may be picked (default: 1)")
    p.add_argument(
        "--dedup", type=float, default=None, help="near-duplicate cosine threshold, e.g. 0.95 (exact copies always go)"
    )
    p.add_argument("--dedup-k", type=int, default=16, help="neighbours searched per image for near-duplicates")
    p.add_argument(
        "--dedup-on",
        choices=("thumbnail", "embedding"),
        default="thumbnail",
        help="near-duplicate descriptor: a 16x16 grey thumbnail (copy detection; default) or the embedding",
    )
    p.add_argument("--seed-set", help="folder or list of seed images: retrieve their nearest pool images")
    p.add_argument("--per-seed", type=int, default=4, help="neighbours retrieved per seed image (default: 4)")
    p.add_argument(
        "--mix",
        action="append",
        default=[],
        help="a source of OUT/mix.yaml: NAME=PATH:WEIGHT (a raw source) or clustered:WEIGHT / retrieved:WEIGHT; "
        "repeatable (default: the curated parts by size)",
    )
    p.add_argument("--homogeneous", help="NAME:FRACTION: that fraction of training steps draws from NAME alone")
    p.add_argument("--resolution", type=int, default=224, help="embedding input size (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=4096, help="images per embedding shard (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes for decoding")
    p.add_argument("--seed", type=int, default=0, help="k-means and sampling seed")
    p.add_argument("--resume", action="store_true", help="continue OUT: keep the stages whose settings did not change")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser(
        "view",
        help="a local web page for dense features: PCA, click-a-patch similarity, correspondence, text",
        description="Serves a page (plain HTML / JS) on http://HOST:PORT: open or drop an image, or pick one of "
        "--images; see the PCA of its patch features; click (or hover) a patch for its cosine-similarity map "
        "over the image and over a second image (correspondence); choose the layer and the input resolution; "
        "with a text-aligned run, type words for per-patch text similarity. An image's features are computed "
        "once and cached while the server runs. Binds 127.0.0.1 unless --host says otherwise; only the files "
        "--images listed at start are served.",
    )
    p.add_argument("model", help="run folder, checkpoint file or registered name (a name alone: random weights)")
    p.add_argument("--weights", help="checkpoint for a named MODEL (loaded strictly, weights_only)")
    p.add_argument("--images", help="a folder (or list) of images to pick from")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="the port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="initial input size (default: the run's crop size, else 224)")
    p.add_argument("--max-resolution", type=int, default=1024, help="largest input size asked (default: 1024)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default: %(default)s MB)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest upload (default: %(default)s MP)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    p.add_argument("--out", default="demo_out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from opendino.models.checkpoint import CheckpointError
    from opendino.models.convert import ConversionError
    from opendino.models.registry import UnknownModelError

    args = build_parser().parse_args(argv)  # argparse exits with 2 on bad usage
    try:
        return args.func(args)
    except (UsageError, UnknownModelError) as e:
        print(f"opendino {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, ConversionError, RuntimeError, OSError, ValueError) as e:
        if os.environ.get("OPENDINO_DEBUG"):
            traceback.print_exc()
        print(f"opendino {args.command}: error: {e}", file=sys.stderr)
        return 1
