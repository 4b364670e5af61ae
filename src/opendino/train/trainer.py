"""The training loop: schedules, step, clipping, optimizer, EMA, logging, checkpoints, resume.

It knows nothing about DINO beyond calling the recipe: ``loss, terms = recipe(batch, ...)``. A run
lives in ``run.dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and, at
the end, ``teacher.safetensors``. Starting a run in a folder that has checkpoints resumes it exactly
(same data, same random numbers), so a killed run continues as if it had never stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from opendino.config import to_dict
from opendino.data.augment import CropConfig, MultiCrop
from opendino.data.loader import build_ssl_loader
from opendino.data.sources import open_source
from opendino.models import load_model, save_model
from opendino.recipes.ssl import SSLRecipe
from opendino.train.checkpoint import load_latest, save_checkpoint
from opendino.train.config import TrainConfig
from opendino.train.logging import MetricsLog
from opendino.train.monitor import DenseMonitor
from opendino.train.optim import apply_schedules, build_optimizer, param_groups, param_settings
from opendino.train.parallel import compile_recipe
from opendino.train.schedules import build_schedules_v2, scale_lr
from opendino.train.step import train_step


class TrainingDiverged(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; valid here: auto, cpu")
    return torch.device(name)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.train.device)
        self.ckpt_dir = self.run_dir / "checkpoints"

    def _crop_sets(self) -> tuple[list[CropConfig], list[float]]:
        """One crop-size set, or the mixed resolutions of high-resolution adaptation with their odds."""
        c, gram = self.cfg.crops, self.cfg.gram
        rows = c.resolution_sets or [[c.global_size, c.local_size, c.global_size * gram.crop_scale, 1.0]]
        sets = []
        for row in rows:
            if len(row) != 4:
                raise ValueError(f"crops.resolution_sets row {row}: need [global, local, Gram teacher, probability]")
            sets.append(
                CropConfig(
                    int(row[0]),
                    int(row[1]),
                    c.n_local,
                    tuple(c.global_scale),
                    tuple(c.local_scale),
                    c.horizontal_flips,
                    gram_size=round(row[2]) if gram.enabled else None,
                    gram_no_distortions=gram.no_distortions,
                    mean=tuple(c.mean),
                    std=tuple(c.std),
                )
            )
        return sets, [float(row[3]) for row in rows]

    def _schedules(self):
        cfg = self.cfg
        scale = scale_lr(1.0, cfg.optim.scaling_rule, cfg.train.batch_size, world_size=1)
        return build_schedules_v2(cfg.schedules, cfg.optim.epochs, cfg.train.epoch_length, scale)

    def run(self) -> Path:
        cfg, device = self.cfg, self.device
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        torch.manual_seed(cfg.train.seed)

        if cfg.data.source == "synthetic" or cfg.data.path is None:
            source = open_source(source="synthetic", n=cfg.data.synthetic_n, size=cfg.data.synthetic_size)
        else:
            source = open_source(cfg.data.path, cfg.data.source)
        source.check_readable()
        recipe = SSLRecipe(cfg).to(device)
        settings = param_settings(recipe.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        groups = param_groups(settings)
        optimizer = build_optimizer(groups, (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        schedules = self._schedules()

        start, bad_steps, skipped_total = 0, 0, 0
        resumed = load_latest(self.ckpt_dir)
        if resumed is not None:
            step, state = resumed
            recipe.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["cpu"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            start, bad_steps, skipped_total = step + 1, state["bad_steps"], state["skipped_images"]
            print(f"resuming {self.run_dir} after step {step}")
        elif cfg.init.from_run:
            start = self._init_from_run(recipe, optimizer)
        elif cfg.init.backbone:
            self._init_backbone(recipe)
        if resumed is None and recipe.gram_teacher is not None:
            if cfg.gram.checkpoint:
                recipe.gram_teacher.load_state_dict(load_model(cfg.gram.checkpoint).state_dict())
            else:
                recipe.refresh_gram_teacher()  # the EMA teacher at the start of the run

        if cfg.train.compile:
            compile_recipe(recipe)
        crop_sets, crop_odds = self._crop_sets()
        multicrop = MultiCrop(crop_sets[0])  # the photometric stage does not depend on the crop sizes
        loader = build_ssl_loader(
            source,
            crop_sets,
            crop_set_probs=crop_odds,
            batch_size=cfg.train.batch_size,
            patch_size=getattr(recipe.student.backbone, "patch_size", 16),
            seed=cfg.train.seed,
            start_step=start,
            num_workers=cfg.data.num_workers,
            photometric_in_worker=not cfg.data.photometric_on_device,
            mask_ratio=tuple(cfg.loss.mask_ratio),
            mask_probability=cfg.loss.mask_probability,
        )
        batches = iter(loader)
        monitor = None
        if cfg.monitor.every:
            if cfg.monitor.every % cfg.log.every:
                raise ValueError(f"monitor.every={cfg.monitor.every} must be a multiple of log.every={cfg.log.every}")
            patch = getattr(recipe.teacher.backbone, "patch_size", 16)
            size = cfg.monitor.size or cfg.crops.global_size
            monitor = DenseMonitor(size, patch, cfg.crops.mean, cfg.crops.std, cfg.monitor.n_fit, cfg.monitor.n_eval)
        log = MetricsLog(self.run_dir, cfg.log.tensorboard, resume_step=start)
        backbone_groups = [g for g in optimizer.param_groups if g["names"][0].startswith("backbone.")]
        total = cfg.total_steps
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not cfg.log.progress)
        window_start, window_images = time.perf_counter(), 0
        pending: list[tuple[int, torch.Tensor]] = []  # (step, finite flag) not yet read on the host

        def read_pending_flags() -> bool:
            """Log the skipped steps since the last read; stop on too many in a row. True if all were good."""
            nonlocal bad_steps
            flags = torch.stack([f for _, f in pending]).tolist() if pending else []
            for (s, _), good in zip(pending, flags, strict=True):
                bad_steps = 0 if good else bad_steps + 1
                if not good:
                    log.log({"step": s, "skipped_step": True, "loss": float("nan"), "bad_steps": bad_steps})
                if bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_steps} consecutive non-finite losses (last at step {s}); the weights were not "
                        f"updated by them and the last checkpoint in {self.ckpt_dir} is intact. Lower the "
                        "learning rate or check the data."
                    )
            pending.clear()
            return all(flags)

        recipe.train()
        try:
            for step in range(start, total):
                apply_schedules(
                    optimizer, schedules.lr[step], schedules.weight_decay[step], schedules.last_layer_lr[step]
                )
                if step < cfg.init.head_warmup_steps:
                    for group in backbone_groups:
                        group["lr"] = 0.0  # heads warm up on a frozen backbone
                batch = _to_device(next(batches), device)
                if cfg.data.photometric_on_device:
                    batch = multicrop.photometric_collated(batch)
                skipped_total += len(batch["skipped"])
                local_weight = schedules.dino_local_loss_weight[step] if schedules.dino_local_loss_weight else 1.0
                gram_weight = 0.0
                if recipe.gram_teacher is not None:
                    gram_weight = (
                        schedules.gram_loss_weight[step] if schedules.gram_loss_weight else cfg.gram.loss_weight
                    )
                    if cfg.gram.refreshes_at(step):
                        recipe.refresh_gram_teacher()
                result = train_step(
                    recipe,
                    optimizer,
                    batch,
                    teacher_temp=schedules.teacher_temp[step],
                    momentum=schedules.momentum[step],
                    clip_grad=cfg.optim.clip_grad,
                    dino_local_weight=local_weight,
                    gram_weight=gram_weight,
                    autocast=device.type == "cuda",
                )
                pending.append((step, result.finite))
                window_images += batch["labels"].shape[0]

                if (step + 1) % cfg.log.every == 0 or step + 1 == total:
                    if read_pending_flags():
                        now = time.perf_counter()
                        record = {
                            "step": step,
                            "loss": result.loss.item(),
                            **{k: v.item() for k, v in result.terms.items()},
                            "lr": schedules.lr[step],
                            "weight_decay": schedules.weight_decay[step],
                            "teacher_temp": schedules.teacher_temp[step],
                            "momentum": schedules.momentum[step],
                            "dino_local_weight": local_weight,
                            **({"gram_weight": gram_weight} if recipe.gram_teacher is not None else {}),
                            **{f"grad_norm_{k}": v.item() for k, v in result.grad_norms.items()},
                            "skipped_images": skipped_total,
                            "images_per_s": window_images / (now - window_start),
                        }
                        if monitor is not None and (step + 1) % cfg.monitor.every == 0:
                            record.update(monitor(recipe.teacher.backbone, recipe.gram_teacher))
                        log.log(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}")
                        window_start, window_images = now, 0
                if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total:
                    read_pending_flags()
                    self._save(step, recipe, optimizer, bad_steps, skipped_total)
                bar.update()
        finally:
            bar.close()
            log.close()
        save_model(recipe.teacher.backbone, self.run_dir / "teacher.safetensors")
        return self.run_dir

    def _save(self, step: int, recipe: SSLRecipe, optimizer, bad_steps: int, skipped: int) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "step": step,
            "model": recipe.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "bad_steps": bad_steps,
            "skipped_images": skipped,
        }
        save_checkpoint(self.ckpt_dir, step, state, self.cfg.checkpoint.keep)

    def _init_from_run(self, recipe: SSLRecipe, optimizer: torch.optim.Optimizer) -> int:
        """Starts this stage from an earlier run's newest checkpoint (``init.from_mode``); returns the step."""
        cfg = self.cfg.init
        previous = load_latest(Path(cfg.from_run) / "checkpoints")
        if previous is None:
            raise FileNotFoundError(f"init.from_run={cfg.from_run}: no readable checkpoint in its checkpoints/")
        step, state = previous
        model = {k: v for k, v in state["model"].items() if not k.startswith("gram_teacher.")}
        if cfg.from_mode == "continue":
            recipe.load_state_dict(model, strict=False)  # the Gram teacher is this stage's own
            optimizer.load_state_dict(state["optimizer"])
            print(f"continuing {cfg.from_run} after its step {step}")
            return step + 1
        if cfg.from_mode == "teacher":
            teacher = {k[len("teacher.") :]: v for k, v in model.items() if k.startswith("teacher.")}
            recipe.student.load_state_dict(teacher)
            recipe.teacher.load_state_dict(teacher)
            print(f"starting from the EMA teacher of {cfg.from_run} (its step {step}), fresh schedule")
            return 0
        raise ValueError(f"init.from_mode={cfg.from_mode!r}; valid: continue, teacher")

    def _init_backbone(self, recipe: SSLRecipe) -> None:
        """Student and teacher backbones from released or earlier weights; the heads stay fresh."""
        source = load_model(self.cfg.init.backbone)
        state = source.state_dict()
        for model in (recipe.student.backbone, recipe.teacher.backbone):
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"init.backbone={self.cfg.init.backbone} does not fit model.arch={self.cfg.model.arch}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
