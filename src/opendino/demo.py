"""The end-to-end demo run by ``make demo``: the most complete path that exists so far.

1. pretrains a tiny ViT with the full SSL recipe (DINO + iBOT + KoLeo, Sinkhorn-Knopp, EMA teacher) on
   the synthetic world (``configs/demo/pretrain.yaml``) and prints its loss curve;
2. continues it with a short Gram-anchoring stage (``configs/demo/gram.yaml``: its models, heads,
   optimizer and step counter, a Gram teacher taken from its EMA teacher);
3. evaluates the final teacher against a random-initialised model of the same architecture with the
   whole evaluation suite (``opendino eval``: k-NN, linear, logistic regression, segmentation, depth,
   correspondence) on held-out synthetic scenes, with the report and pictures in ``<out>/eval``;
4. aligns a text tower to the final teacher, frozen (dino.txt, ``configs/text/demo.yaml``: its tokens cached
   once), and prints zero-shot classification and image-text retrieval on held-out scenes against chance
   and against a random-initialised text tower on the same backbone;
5. checks interoperability: a released-architecture ViT-S/16 (random weights) gives the same features in
   timm and Hugging Face transformers as here (the trained demo model has an unmasked key bias, as the
   official training default, which those layouts cannot hold: docs/models.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from opendino.eval.report import HEADLINE
from opendino.eval.suite import evaluate
from opendino.models import build_model
from opendino.models.convert import hf_config, to_hf, to_timm
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
PRESET, GRAM_PRESET = CONFIGS / "pretrain.yaml", CONFIGS / "gram.yaml"
TEXT_PRESET = CONFIGS.parent / "text" / "demo.yaml"
# The least the text stage beats chance by on held-out scenes (zero-shot top-1 over 10 classes, retrieval
# R@1 over the val images), stated in the README and asserted by the slow demo test. Zero-shot stays close
# to chance: the demo backbone's global features hardly tell the shapes apart (docs/text.md, "Results").
TEXT_MARGINS = {("zeroshot", "top1"): 0.03, ("retrieval", "image_to_text_r1"): 0.05}
GRAM_STEPS = 60
# The least the trained model beats its random-initialised twin by, stated in the README and asserted by
# the slow demo test at reduced length (lower RMSE is better; every other metric higher). Correspondence
# has no margin: the demo model does not beat random init there yet (docs/evaluation.md).
MARGINS = {
    ("knn", "top1_k20"): 0.06,
    ("linear", "top1"): 0.06,
    ("logreg", "top1"): 0.06,
    ("seg", "miou"): 0.01,
    ("seg", "nn_miou"): 0.02,
    ("depth", "delta1"): 0.03,
    ("depth", "rmse"): 0.1,
    ("corr", "recall_1patch"): 0.02,
}
N_TRAIN, N_TEST = 1000, 500
README_TABLE = "readme_table.md"  # in the demo's folder: the README's demo table, as this run printed it
_ROW_NAMES = {
    ("knn", "top1_k20"): ("k-NN", "top-1, k = 20"),
    ("linear", "top1"): ("linear probe", "top-1"),
    ("logreg", "top1"): ("logistic regression", "top-1"),
    ("seg", "miou"): ("segmentation, linear", "mIoU"),
    ("seg", "nn_miou"): ("segmentation, nearest neighbour", "mIoU"),
    ("corr", "recall_1patch"): ("correspondence", "recall within 1 patch"),
}


def readme_table(results: dict) -> str:
    """The README's demo table (markdown) of a demo run's results: every stated margin, and the text stage
    against its random text tower and chance."""
    trained, floor = results["trained"], results["random_init"]
    lines = ["| task | metric | trained | random init | stated margin |", "|---|---|---|---|---|"]
    for (task, metric), (name, label) in _ROW_NAMES.items():
        row = f"| {name} | {label} | {trained[task][metric]:.3f} | {floor[task][metric]:.3f} |"
        lines.append(f"{row} +{MARGINS[(task, metric)]:.2f} |")
        if task == "seg" and metric == "nn_miou":  # depth after segmentation, as the demo prints
            d, f = trained["depth"], floor["depth"]
            depth = f"{d['delta1']:.3f} / {d['rmse']:.2f} | {f['delta1']:.3f} / {f['rmse']:.2f}"
            margins = f"+{MARGINS[('depth', 'delta1')]:.2f} / −{MARGINS[('depth', 'rmse')]:.2f}"
            lines.append(f"| depth, linear | δ1 / RMSE (m) | {depth} | {margins} |")
    text = results["text"]
    for (task, metric), margin in TEXT_MARGINS.items():
        t, f = text["trained"][task], text["random_init"][task]
        chance = t["chance_" + metric.replace("image_to_text_", "")]
        label = "zero-shot, 10 classes" if task == "zeroshot" else f"retrieval, {t['n_pairs']} pairs"
        name = "top-1" if task == "zeroshot" else "R@1 image → text"
        lines.append(
            f"| text: {label} | {name} | {t[metric]:.3f} | {f[metric]:.3f} (text tower) | "
            f"+{margin:.2f} over chance {chance:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


def _peer_differences(model: torch.nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Max |diff| of all output tokens against timm and transformers fed our converted weights."""
    ours = _tokens(model.forward_features(x))
    state = model.state_dict()
    result = {}
    try:
        import timm

        peer = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, dynamic_img_size=True)
        peer.load_state_dict(to_timm(state), strict=True)
        result["timm Eva"] = f"{(peer.eval().forward_features(x) - ours).abs().max().item():.2e}"
    except ImportError:
        result["timm Eva"] = "timm not installed"
    try:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        cfg = {k: v for k, v in hf_config(model.model_kwargs).items() if k not in ("model_type", "architectures")}
        peer = DINOv3ViTModel(DINOv3ViTConfig(**cfg))
        peer.load_state_dict(to_hf(state), strict=True)
        diff = (peer.eval()(pixel_values=x).last_hidden_state - ours).abs().max().item()
        result["transformers DINOv3ViTModel"] = f"{diff:.2e}"
    except ImportError:
        result["transformers DINOv3ViTModel"] = "transformers not installed"
    return result


def run_demo(
    out: Path,
    overrides: list[str] = (),
    n_train: int = N_TRAIN,
    n_val: int = N_TEST,
    gram_steps: int = GRAM_STEPS,
    text_overrides: list[str] = (),
) -> dict:
    """Runs the demo, prints its report and returns the evaluation results (as ``opendino eval``; the text
    stage's under ``"text"``). ``overrides`` apply to both SSL stages, ``text_overrides`` to the text stage."""
    t0 = time.perf_counter()
    cfg = load_train_config(PRESET, [f"run.dir={out / 'pretrain'}", *overrides])
    pretrained = Trainer(cfg).run()
    pretrain_s = time.perf_counter() - t0
    gram_cfg = load_train_config(
        GRAM_PRESET,
        [
            f"run.dir={out / 'gram'}",
            f"init.from_run={pretrained}",
            *overrides,
            f"train.steps={cfg.total_steps + gram_steps}",
        ],
    )
    run = Trainer(gram_cfg).run()
    train_s = time.perf_counter() - t0
    records = [r for r in read_metrics(pretrained) + read_metrics(run) if not r.get("skipped_step")]
    # Twice the training crop size: a finer patch grid for the dense tasks.
    results = evaluate(
        run,
        out=out / "eval",
        resolution=2 * cfg.crops.global_size,
        n_train=n_train,
        n_val=n_val,
        progress=False,
        log=lambda _: None,
    )

    text_cfg = load_train_config(
        TEXT_PRESET, [f"run.dir={out / 'text'}", f"init.backbone={run}", "log.progress=false", *text_overrides]
    )
    t_text = time.perf_counter()
    text_run = Trainer(text_cfg).run()
    text_results = evaluate(
        text_run,
        out=out / "text" / "eval",
        tasks=("zeroshot", "retrieval"),
        n_train=10,
        n_val=n_val,
        progress=False,
        log=lambda _: None,
    )
    text_s = time.perf_counter() - t_text

    with torch.inference_mode():
        vits = build_model("vits16").eval()
        batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        peers = _peer_differences(vits, batch)

    print(f"\nOpenDINO demo — SSL pretraining of a tiny ViT on the synthetic world, then Gram anchoring ({run})\n")
    print("  step   loss    dino_local  ibot    koleo   gram")
    for r in records[:: max(1, len(records) // 8)] + ([records[-1]] if len(records) % 8 else []):
        gram = f"{r['gram']:.3f}" if "gram" in r else "-"
        terms = f"{r['loss']:.3f}  {r['dino_local']:.3f}       {r['ibot']:.3f}   {r['koleo']:.3f}   {gram}"
        print(f"  {r['step']:>4}   {terms}")
    print(f"\n  evaluation on held-out scenes (train {n_train}, val {n_val}, 10 classes; report: {out / 'eval'}):")
    print(f"  {'task':<7} {'metric':<14} {'trained':>8} {'random init':>12}   stated margin")
    # the training-free dense probe beside the linear one, and depth's error beside its accuracy
    rows = [*HEADLINE.items(), ("seg", "nn_miou"), ("depth", "rmse")]
    for task, metric in rows:
        trained, floor = results["trained"][task][metric], results["random_init"][task][metric]
        margin = MARGINS[(task, metric)]
        gain = floor - trained if metric == "rmse" else trained - floor
        check = f"{'-' if metric == 'rmse' else '+'}{margin:.2f} {'met' if gain >= margin else 'NOT MET'}"
        print(f"  {task:<7} {metric:<14} {trained:>8.3f} {floor:>12.3f}   {check}")
    print(
        f"\n  text alignment (dino.txt on the frozen teacher, {text_cfg.total_steps} steps; report: "
        f"{out / 'text' / 'eval'}):"
    )
    print(f"  {'task':<9} {'metric':<18} {'trained':>8} {'random text':>12} {'chance':>7}   stated margin over chance")
    for (task, metric), margin in TEXT_MARGINS.items():
        trained, floor = text_results["trained"][task][metric], text_results["random_init"][task][metric]
        chance = text_results["trained"][task]["chance_" + metric.replace("image_to_text_", "")]
        check = f"+{margin:.2f} {'met' if trained - chance >= margin else 'NOT MET'}"
        print(f"  {task:<9} {metric:<18} {trained:>8.3f} {floor:>12.3f} {chance:>7.3f}   {check}")
    print("\n  interoperability (ViT-S/16, our weights in peer libraries, max |diff| of all tokens):")
    for name, value in peers.items():
        print(f"    {name:<28} {value}")
    print(
        f"\n  pretraining {pretrain_s:.0f}s, Gram anchoring {train_s - pretrain_s:.0f}s, text alignment "
        f"{text_s:.0f}s, total {time.perf_counter() - t0:.0f}s\n"
    )
    results = {**results, "text": text_results}
    (out / README_TABLE).write_text(readme_table(results))
    print(f"  the README's demo table of this run: {out / README_TABLE}")
    images = next((out / "eval" / "cache").glob("synthetic-*/val"), None)
    if images is not None:
        print(f"  look at its features in a browser: opendino view {text_run} --images {images}\n")
    return results
