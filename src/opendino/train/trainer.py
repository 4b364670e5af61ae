"""The training loop: schedules, step, clipping, optimizer, EMA, logging, checkpoints, resume.

It knows nothing about DINO beyond calling the recipe: ``loss, terms = recipe(batch, ...)``. A run
lives in ``run.dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and, at
the end, ``teacher.safetensors``. Starting a run in a folder that has checkpoints resumes it exactly
(same data, same random numbers), so a killed run continues as if it had never stopped.

Under torchrun every rank runs this loop on its share of each batch; rank 0 alone writes the run folder.
Checkpoints hold full (unsharded) states keyed by parameter name, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from opendino.config import to_dict
from opendino.data.augment import CropConfig, MultiCrop
from opendino.data.loader import build_ssl_loader
from opendino.data.sources import open_source
from opendino.models import load_model, save_model
from opendino.recipes.ssl import SSLRecipe
from opendino.train.checkpoint import load_latest, save_checkpoint
from opendino.train.config import TrainConfig
from opendino.train.distributed import (
    close_distributed,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    sum_over_ranks,
)
from opendino.train.logging import MetricsLog
from opendino.train.monitor import DenseMonitor
from opendino.train.optim import apply_schedules, build_optimizer, param_groups, param_settings
from opendino.train.parallel import parallelize
from opendino.train.schedules import build_schedules_v2, scale_lr
from opendino.train.step import train_step

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainingDiverged(RuntimeError):
    pass


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.env, self.device = init_distributed(cfg.train.device)
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
        scale = scale_lr(1.0, cfg.optim.scaling_rule, cfg.train.batch_size, world_size=self.env.world_size)
        return build_schedules_v2(cfg.schedules, cfg.optim.epochs, cfg.train.epoch_length, scale)

    def run(self) -> Path:
        cfg, device, env = self.cfg, self.device, self.env
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank

        if cfg.data.source == "synthetic" or cfg.data.path is None:
            source = open_source(source="synthetic", n=cfg.data.synthetic_n, size=cfg.data.synthetic_size)
        else:
            source = open_source(cfg.data.path, cfg.data.source)
        source.check_readable()
        recipe = SSLRecipe(cfg)
        # Weights are restored into the plain modules, before any wrapping; the optimizer state after it.
        start, bad_steps, skipped_total, optimizer_state, rng = 0, 0, 0, None, None
        resumed = load_latest(self.ckpt_dir)
        if resumed is not None:
            step, state = resumed
            recipe.load_state_dict(state["model"])
            optimizer_state, rng = state["optimizer"], state["rng"]
            start, bad_steps, skipped_total = step + 1, state["bad_steps"], state["skipped_images"]
            if env.is_main:
                print(f"resuming {self.run_dir} after step {step}")
        elif cfg.init.from_run:
            start, optimizer_state = self._init_from_run(recipe)
        elif cfg.init.backbone:
            self._init_backbone(recipe)
        if resumed is None and recipe.gram_teacher is not None:
            if cfg.gram.checkpoint:
                recipe.gram_teacher.load_state_dict(load_model(cfg.gram.checkpoint).state_dict())
            else:
                recipe.refresh_gram_teacher()  # the EMA teacher at the start of the run
        self._seed_rank(rng, start)

        recipe.to(device)
        parallelize(recipe, cfg.parallel, cfg.train.compile, env.world_size, device)
        settings = param_settings(recipe.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        optimizer = build_optimizer(param_groups(settings), (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        if optimizer_state is not None:
            set_optimizer_state_dict(
                recipe.student, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
            )
        schedules = self._schedules()

        crop_sets, crop_odds = self._crop_sets()
        multicrop = MultiCrop(crop_sets[0])  # the photometric stage does not depend on the crop sizes
        loader = build_ssl_loader(
            source,
            crop_sets,
            crop_set_probs=crop_odds,
            batch_size=cfg.train.batch_size,
            patch_size=getattr(recipe.student.backbone, "patch_size", 16),
            seed=cfg.train.seed,
            rank=env.rank,
            world_size=env.world_size,
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
        log = MetricsLog(self.run_dir, cfg.log.tensorboard, resume_step=start) if env.is_main else None
        backbone_groups = [g for g in optimizer.param_groups if g["names"][0].startswith("backbone.")]
        total = cfg.total_steps
        bar = tqdm(
            total=total, initial=start, desc="train", unit="step", disable=not (cfg.log.progress and env.is_main)
        )
        window_start, window_images = time.perf_counter(), 0
        pending: list[tuple[int, torch.Tensor]] = []  # (step, finite flag) not yet read on the host

        def read_pending_flags() -> bool:
            """Log the skipped steps since the last read; stop on too many in a row. True if all were good."""
            nonlocal bad_steps
            flags = torch.stack([f for _, f in pending]).tolist() if pending else []
            for (s, _), good in zip(pending, flags, strict=True):
                bad_steps = 0 if good else bad_steps + 1
                if not good and log is not None:
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
                            **mean_over_ranks({"loss": result.loss, **result.terms}),
                            "lr": schedules.lr[step],
                            "weight_decay": schedules.weight_decay[step],
                            "teacher_temp": schedules.teacher_temp[step],
                            "momentum": schedules.momentum[step],
                            "dino_local_weight": local_weight,
                            **({"gram_weight": gram_weight} if recipe.gram_teacher is not None else {}),
                            **{f"grad_norm_{k}": v.item() for k, v in result.grad_norms.items()},
                            "skipped_images": sum_over_ranks(skipped_total, device),
                            "images_per_s": window_images * env.world_size / (now - window_start),
                        }
                        if monitor is not None and (step + 1) % cfg.monitor.every == 0:
                            # on every rank: a sharded teacher needs all of them for its forward
                            record.update(monitor(recipe.teacher.backbone, recipe.gram_teacher))
                        if log is not None:
                            log.log(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}")
                        window_start, window_images = now, 0
                if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total:
                    read_pending_flags()
                    self._save(step, recipe, optimizer, bad_steps, skipped_total)
                bar.update()
        finally:
            bar.close()
            if log is not None:
                log.close()
        teacher = get_model_state_dict(recipe.teacher.backbone, options=FULL_STATE)
        if env.is_main:
            save_model(recipe.teacher.backbone, self.run_dir / "teacher.safetensors", state=teacher)
        close_distributed()
        return self.run_dir

    def _seed_rank(self, rng: list[dict] | None, start: int) -> None:
        """Random streams of this rank: restored from a checkpoint written by as many ranks, else seeded
        per rank (stochastic depth and RoPE augmentation differ across ranks, as in the official code)."""
        env = self.env
        if rng is not None and len(rng) == env.world_size:
            torch.set_rng_state(rng[env.rank]["cpu"])
            if "cuda" in rng[env.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng[env.rank]["cuda"], self.device)
            return
        if rng is not None and env.is_main:
            print(
                f"note: the checkpoint was written by {len(rng)} ranks, this run has {env.world_size}: "
                "weights, optimizer, data order and masks carry on exactly; random streams restart"
            )
        torch.manual_seed(self.cfg.train.seed + 1_000_003 * (start + 1) + env.rank)

    def _save(self, step: int, recipe: SSLRecipe, optimizer, bad_steps: int, skipped: int) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": step,
            # full states keyed by parameter name: readable by any number of ranks
            "model": get_model_state_dict(recipe, options=FULL_STATE),
            "optimizer": get_optimizer_state_dict(recipe.student, optimizer, options=FULL_STATE),
            "rng": gather_objects(rng),
            "bad_steps": bad_steps,
            "skipped_images": sum_over_ranks(skipped, self.device),
        }
        if self.env.is_main:
            save_checkpoint(self.ckpt_dir, step, state, self.cfg.checkpoint.keep)

    def _init_from_run(self, recipe: SSLRecipe) -> tuple[int, dict | None]:
        """Starts this stage from an earlier run's newest checkpoint (``init.from_mode``); returns the step
        to start at and the optimizer state to carry on (or None)."""
        cfg = self.cfg.init
        previous = load_latest(Path(cfg.from_run) / "checkpoints")
        if previous is None:
            raise FileNotFoundError(f"init.from_run={cfg.from_run}: no readable checkpoint in its checkpoints/")
        step, state = previous
        model = {k: v for k, v in state["model"].items() if not k.startswith("gram_teacher.")}
        if cfg.from_mode == "continue":
            recipe.load_state_dict(model, strict=False)  # the Gram teacher is this stage's own
            if self.env.is_main:
                print(f"continuing {cfg.from_run} after its step {step}")
            return step + 1, state["optimizer"]
        if cfg.from_mode == "teacher":
            teacher = {k[len("teacher.") :]: v for k, v in model.items() if k.startswith("teacher.")}
            recipe.student.load_state_dict(teacher)
            recipe.teacher.load_state_dict(teacher)
            if self.env.is_main:
                print(f"starting from the EMA teacher of {cfg.from_run} (its step {step}), fresh schedule")
            return 0, None
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
