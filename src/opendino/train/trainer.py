"""The training loop: schedules, step, clipping, optimizer, EMA, logging, checkpoints, resume.

It knows nothing about DINO beyond calling the recipe: ``loss, terms = recipe(batch, ...)``. A run
lives in ``run.dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and, at
the end, ``teacher.safetensors``. Starting a run in a folder that has checkpoints resumes it exactly
(same data, same random numbers), so a killed run continues as if it had never stopped.

Under torchrun every rank runs this loop on its share of each batch; rank 0 alone writes the run folder.
Checkpoints hold full (unsharded) states keyed by parameter name, so a run resumes on any number of ranks.
In distillation a frozen teacher outside the recipes gives the targets, and with several students each is
a ``Member`` with its own recipe, optimizer, schedules, random streams and sub-folder, fed the same batches
and the same teacher forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader
from tqdm import tqdm

from opendino.config import to_dict
from opendino.data.augment import CropConfig, MultiCrop
from opendino.data.loader import build_ssl_loader
from opendino.data.sources import ImageSource, open_source
from opendino.models import load_model, save_model
from opendino.recipes.distill import distillation_teacher_logits, load_distillation_teacher
from opendino.recipes.ssl import SSLRecipe
from opendino.train.checkpoint import common_steps, list_checkpoints, load_latest, save_checkpoint
from opendino.train.config import TrainConfig, student_configs
from opendino.train.distributed import (
    DistributedEnv,
    close_distributed,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    sum_over_ranks,
)
from opendino.train.logging import MetricsLog, SkippedImagesLog
from opendino.train.monitor import DenseMonitor
from opendino.train.optim import apply_schedules, build_optimizer, param_groups, param_settings
from opendino.train.parallel import parallelize, parallelize_frozen
from opendino.train.schedules import build_schedules_v2, scale_lr
from opendino.train.step import StepResult, train_step

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainingDiverged(RuntimeError):
    pass


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# Settings a resumed run may change without changing what it computes.
FREE_ON_RESUME = ("run.", "train.steps", "train.device", "log.", "checkpoint.", "data.num_workers", "monitor.")


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs, other than those of FREE_ON_RESUME."""
    changes = []
    for key in sorted(set(before) | set(after)):
        name, old, new = f"{prefix}{key}", before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{name}.")
        elif old != new and not name.startswith(FREE_ON_RESUME):
            changes.append(f"{name}: {old} -> {new}")
    return changes


class Member:
    """One trained network of a run: its recipe (student, EMA, heads), optimizer, schedules, run folder,
    metrics and checkpoints. A run has one; multi-student distillation has one per student, all fed the
    same batches and the same teacher forward pass."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, env: DistributedEnv, device: torch.device) -> None:
        self.cfg, self.run_dir, self.env, self.device = cfg, Path(run_dir), env, device
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.bad_steps, self.skipped = 0, 0
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, finite flag) not yet read on the host
        self.log: MetricsLog | None = None
        self.rng: dict[str, Tensor] = {}  # this member's random streams between its steps

    def build(self, resume_steps: set[int] | None) -> int:
        """Builds and restores the recipe (from this member's newest checkpoint among ``resume_steps``, or as
        the config says); returns the first step to run."""
        cfg, env = self.cfg, self.env
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file, previous = self.run_dir / "config.yaml", None
        if env.is_main:  # only the rank that writes it reads it: another could see it half written
            previous = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
            config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.recipe = recipe = SSLRecipe(cfg)
        # Weights are restored into the plain modules, before any wrapping; the optimizer state after it.
        start, optimizer_state, rng = 0, None, None
        resumed = load_latest(self.ckpt_dir, steps=resume_steps) if resume_steps else None
        if resumed is not None:
            resume_step, state = resumed
            recipe.load_state_dict(state["model"])
            optimizer_state, rng = state["optimizer"], state["rng"]
            start, self.bad_steps, self.skipped = resume_step + 1, state["bad_steps"], state["skipped_images"]
            if env.is_main:
                print(f"resuming {self.run_dir} after step {resume_step}")
                changed = changed_settings(previous or {}, to_dict(cfg))
                if changed:
                    print(f"warning: resumed with settings changed since the last start: {', '.join(changed)}")
        elif cfg.init.from_run:
            start, optimizer_state = self._init_from_run()
        elif cfg.init.backbone or cfg.init.backbone_blocks is not None:
            self._init_backbone()
        if resumed is None and recipe.gram_teacher is not None:
            if cfg.gram.checkpoint:
                recipe.gram_teacher.load_state_dict(load_backbone(cfg.gram.checkpoint).state_dict())
            else:
                recipe.refresh_gram_teacher()  # the EMA teacher at the start of the run
        self._seed_rank(rng, start)

        recipe.to(self.device)
        parallelize(recipe, cfg.parallel, cfg.train.compile, env.world_size, self.device)
        settings = param_settings(recipe.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        self.optimizer = build_optimizer(param_groups(settings), (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        if optimizer_state is not None:
            set_optimizer_state_dict(
                recipe.student, self.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
            )
        scale = scale_lr(1.0, cfg.optim.scaling_rule, cfg.train.batch_size, world_size=env.world_size)
        self.schedules = build_schedules_v2(cfg.schedules, cfg.optim.epochs, cfg.train.epoch_length, scale)
        self.backbone_groups = [g for g in self.optimizer.param_groups if g["names"][0].startswith("backbone.")]
        if env.is_main:
            self.log = MetricsLog(self.run_dir, cfg.log.tensorboard, resume_step=start)
        self.rng = self._get_rng()
        recipe.train()
        return start

    def step(self, step: int, batch: dict, teacher_logits: tuple[Tensor, Tensor] | None) -> StepResult:
        cfg, recipe, schedules = self.cfg, self.recipe, self.schedules
        self._set_rng(self.rng)  # its own streams: a member draws the same with or without others
        apply_schedules(self.optimizer, schedules.lr[step], schedules.weight_decay[step], schedules.last_layer_lr[step])
        if step < cfg.init.head_warmup_steps:
            for group in self.backbone_groups:
                group["lr"] = 0.0  # heads warm up on a frozen backbone
        self.skipped += len(batch["skipped"])
        self.local_weight = schedules.dino_local_loss_weight[step] if schedules.dino_local_loss_weight else 1.0
        self.gram_weight = 0.0
        if recipe.gram_teacher is not None:
            self.gram_weight = schedules.gram_loss_weight[step] if schedules.gram_loss_weight else cfg.gram.loss_weight
            if cfg.gram.refreshes_at(step):
                recipe.refresh_gram_teacher()
        result = train_step(
            recipe,
            self.optimizer,
            batch,
            teacher_temp=schedules.teacher_temp[step],
            momentum=schedules.momentum[step],
            clip_grad=cfg.optim.clip_grad,
            dino_local_weight=self.local_weight,
            gram_weight=self.gram_weight,
            teacher_logits=teacher_logits,
            autocast=self.device.type == "cuda",
        )
        self.pending.append((step, result.finite))
        self.rng = self._get_rng()
        return result

    def _get_rng(self) -> dict[str, Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self, rng: dict[str, Tensor]) -> None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def read_pending_flags(self) -> bool:
        """Logs the skipped steps since the last read; stops on too many in a row. True if all were good."""
        flags = torch.stack([f for _, f in self.pending]).tolist() if self.pending else []
        for (s, _), good in zip(self.pending, flags, strict=True):
            self.bad_steps = 0 if good else self.bad_steps + 1
            if not good and self.log is not None:
                self.log.log({"step": s, "skipped_step": True, "loss": float("nan"), "bad_steps": self.bad_steps})
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                newest = list_checkpoints(self.ckpt_dir)
                kept = f"the newest checkpoint, {newest[-1][1]}, is intact" if newest else "no checkpoint was written"
                raise TrainingDiverged(
                    f"{self.bad_steps} consecutive non-finite losses (last at step {s}); the weights were not "
                    f"updated by them and {kept}. Lower the learning rate or check the data."
                )
        self.pending.clear()
        return all(flags)

    def record(self, step: int, result: StepResult, images_per_s: float) -> dict:
        s = self.schedules
        return {
            "step": step,
            **mean_over_ranks({"loss": result.loss, **result.terms}),
            "lr": s.lr[step],
            "weight_decay": s.weight_decay[step],
            "teacher_temp": s.teacher_temp[step],
            "momentum": s.momentum[step],
            "dino_local_weight": self.local_weight,
            **({"gram_weight": self.gram_weight} if self.recipe.gram_teacher is not None else {}),
            **{f"grad_norm_{k}": v.item() for k, v in result.grad_norms.items()},
            "skipped_images": sum_over_ranks(self.skipped, self.device),
            "images_per_s": images_per_s,
        }

    def save(self, step: int) -> None:
        state = {
            "step": step,
            # full states keyed by parameter name: readable by any number of ranks
            "model": get_model_state_dict(self.recipe, options=FULL_STATE),
            "optimizer": get_optimizer_state_dict(self.recipe.student, self.optimizer, options=FULL_STATE),
            "rng": gather_objects(self.rng),
            "bad_steps": self.bad_steps,
            "skipped_images": sum_over_ranks(self.skipped, self.device),
        }
        if self.env.is_main:
            save_checkpoint(self.ckpt_dir, step, state, self.cfg.checkpoint.keep)

    def finish(self) -> None:
        """Exports the EMA model (the teacher of SSL, the student's EMA in distillation)."""
        teacher = get_model_state_dict(self.recipe.teacher.backbone, options=FULL_STATE)
        if self.env.is_main:
            save_model(self.recipe.teacher.backbone, self.run_dir / "teacher.safetensors", state=teacher)

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()

    def _seed_rank(self, rng: list[dict] | None, start: int) -> None:
        """Random streams of this rank: restored from a checkpoint written by as many ranks, else seeded
        per rank (stochastic depth and RoPE augmentation differ across ranks, as in the official code)."""
        env = self.env
        if rng is not None and len(rng) == env.world_size:
            self._set_rng({k: v for k, v in rng[env.rank].items() if k == "cpu" or self.device.type == "cuda"})
            return
        if rng is not None and env.is_main:
            print(
                f"note: the checkpoint was written by {len(rng)} ranks, this run has {env.world_size}: "
                "weights, optimizer, data order and masks carry on exactly; random streams restart"
            )
        torch.manual_seed(self.cfg.train.seed + 1_000_003 * (start + 1) + env.rank)

    def _init_from_run(self) -> tuple[int, dict | None]:
        """Starts this stage from an earlier run's newest checkpoint (``init.from_mode``); returns the step
        to start at and the optimizer state to carry on (or None)."""
        cfg, recipe = self.cfg.init, self.recipe
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

    def _init_backbone(self) -> None:
        """Student and teacher backbones from released or earlier weights (by default, with
        ``init.backbone_blocks``, the distillation teacher's); the heads stay fresh."""
        init, teacher = self.cfg.init, self.cfg.distill.teacher
        if init.backbone:
            name, state = init.backbone, load_backbone(init.backbone).state_dict()
            if self.env.is_main:
                print(f"student and teacher backbones initialised from {init.backbone}; heads fresh")
        elif teacher:
            name, state = f"distill.teacher={teacher}", load_distillation_teacher(teacher).backbone.state_dict()
        else:
            raise ValueError("init.backbone_blocks: the blocks of what? Set init.backbone (or distill.teacher)")
        if init.backbone_blocks is not None:
            state = select_blocks(state, init.backbone_blocks, name)
        for model in (self.recipe.student.backbone, self.recipe.teacher.backbone):
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{name} does not fit model.arch={self.cfg.model.arch}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )


def load_backbone(source: str) -> nn.Module:
    """A backbone from a checkpoint file or a model name, or from a run folder (its newest EMA teacher)."""
    if (Path(source) / "config.yaml").is_file():
        return load_distillation_teacher(source).backbone
    return load_model(source)


def select_blocks(state: dict[str, Tensor], blocks: list[int], source: str) -> dict[str, Tensor]:
    """A ViT state dict with only ``blocks`` of ``state``, renumbered ``0, 1, ...`` in the given order."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if not depth:
        raise ValueError(f"init.backbone_blocks: {source} has no transformer blocks (a ViT is needed)")
    if not blocks or any(not 0 <= b < depth for b in blocks):
        raise ValueError(f"init.backbone_blocks={blocks}: {source} has blocks 0..{depth - 1}")
    selected = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new, old in enumerate(blocks):
        prefix = f"blocks.{old}."
        selected.update({f"blocks.{new}.{k[len(prefix) :]}": v for k, v in state.items() if k.startswith(prefix)})
    return selected


class Trainer:
    """Runs one configuration: its members (one network, or one per distilled student), the shared data
    loader and, in distillation, the frozen teacher whose forward pass all members share."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.env, self.device = init_distributed(cfg.train.device)

    def _crop_sets(self) -> tuple[list[CropConfig], list[float]]:
        """One crop-size set, or the mixed resolutions of high-resolution adaptation with their odds."""
        c, gram = self.cfg.crops, self.cfg.gram
        rows = self.cfg.crop_size_sets
        sets = []
        for row in rows:
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

    def _members(self) -> list[Member]:
        cfg = self.cfg
        if not cfg.distill.students:
            return [Member(cfg, self.run_dir, self.env, self.device)]
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return [
            Member(cfg_i, self.run_dir / name, self.env, self.device) for name, cfg_i in student_configs(cfg).items()
        ]

    def open_source(self) -> ImageSource:
        """The configured image source, checked to hold at least one readable image."""
        data = self.cfg.data
        source = open_source(data.path, data.source, n=data.synthetic_n, size=data.synthetic_size)
        source.check_readable()
        return source

    def loader(self, source: ImageSource, start: int, patch_size: int) -> DataLoader:
        """The data loader of steps ``start``, ``start + 1``, ...: workers decode, crop (uint8; only draw the
        crop boxes with ``data.crops_on_device``) and collate with the iBOT masks, and distort too unless
        ``data.photometric_on_device``. ``patch_size``: of the network whose token grid the masks follow."""
        cfg = self.cfg
        crop_sets, crop_odds = self._crop_sets()
        return build_ssl_loader(
            source,
            crop_sets,
            crop_set_probs=crop_odds,
            batch_size=cfg.train.batch_size,
            patch_size=patch_size,
            teacher_to_student_resolution_scale=cfg.crops.teacher_to_student_resolution_scale,
            seed=cfg.train.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            start_step=start,
            num_workers=cfg.data.num_workers,
            photometric_in_worker=not cfg.data.photometric_on_device,
            crops_on_device=cfg.data.crops_on_device,
            max_image_side=cfg.data.max_image_side,
            mask_ratio=tuple(cfg.loss.mask_ratio),
            mask_probability=cfg.loss.mask_probability,
        )

    def device_batches(self, source: ImageSource, start: int, patch_size: int) -> Iterator[dict]:
        """The loader's batches on the device, with the crops cut (``data.crops_on_device``) and distorted
        (``data.photometric_on_device``) batched there."""
        multicrops = [MultiCrop(c) for c in self._crop_sets()[0]]
        for batch in self.loader(source, start, patch_size):
            batch = _to_device(batch, self.device)
            if "images" in batch:
                batch = multicrops[batch.pop("crop_set")].geometric_collated(batch)
            # the photometric stage does not depend on crop sizes
            yield multicrops[0].photometric_collated(batch) if self.cfg.data.photometric_on_device else batch

    def run(self) -> Path:
        cfg, device, env = self.cfg, self.device, self.env
        source = self.open_source()

        if cfg.distill.teacher and cfg.gram.enabled:
            raise ValueError("distillation has no Gram anchoring (recipe.md §4.6): set gram.enabled=false")
        if not cfg.distill.teacher and cfg.loss.sinkhorn_iterations == 0:
            raise ValueError(
                "loss.sinkhorn_iterations=0 (no centring) needs a frozen distill.teacher: an EMA teacher collapses"
            )
        members = self._members()
        resume = common_steps([m.ckpt_dir for m in members])
        start = {m.build(resume) for m in members}
        if len(start) != 1:
            raise ValueError(f"the students would start at different steps {sorted(start)}: check init.*")
        start = start.pop()
        schedule_end = round(cfg.optim.epochs * cfg.train.epoch_length)
        if cfg.total_steps > schedule_end and env.is_main:
            print(
                f"warning: train.steps={cfg.total_steps} runs past the end of the schedules (optim.epochs="
                f"{cfg.optim.epochs:g} x train.epoch_length={cfg.train.epoch_length} = {schedule_end} steps): later "
                "steps keep their end values (lr at its end, momentum at its end: the teacher may stop moving); "
                "lengthen a run with optim.epochs"
            )
        if start >= cfg.total_steps and env.is_main:
            print(f"nothing to run: {self.run_dir} already holds steps 0-{start - 1} (train.steps={cfg.total_steps})")
        teacher = None
        if cfg.distill.teacher:
            teacher = load_distillation_teacher(cfg.distill.teacher, *(m.recipe.student for m in members))
            teacher.to(device)
            parallelize_frozen(teacher, cfg.parallel, cfg.train.compile, env.world_size)
        # The mask grid is the teacher's token grid on its (possibly downscaled) crops.
        patch_owner = teacher if teacher is not None else members[0].recipe.student
        batches = self.device_batches(source, start, getattr(patch_owner.backbone, "patch_size", 16))
        monitor = None
        if cfg.monitor.every:
            patch = getattr(members[0].recipe.teacher.backbone, "patch_size", 16)
            size = cfg.monitor.size or cfg.crops.global_size
            monitor = DenseMonitor(size, patch, cfg.crops.mean, cfg.crops.std, cfg.monitor.n_fit, cfg.monitor.n_eval)
        total = cfg.total_steps
        bar = tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            # None: shown on a terminal only, so no carriage-return bars end up in log files
            disable=None if cfg.log.progress and env.is_main else True,
        )
        window_start, window_images = time.perf_counter(), 0
        skipped_log = SkippedImagesLog(self.run_dir) if env.is_main else None
        skipped: list[str] = []  # this rank's unreadable images since the last logging point
        try:
            for step in range(start, total):
                batch = next(batches)
                skipped += batch["skipped"]
                teacher_logits = None
                if teacher is not None:
                    teacher_logits = distillation_teacher_logits(
                        teacher, batch, cfg.crops.teacher_to_student_resolution_scale
                    )
                results = [m.step(step, batch, teacher_logits) for m in members]
                window_images += batch["labels"].shape[0]

                if (step + 1) % cfg.log.every == 0 or step + 1 == total:
                    for rank_skipped in gather_objects(skipped):
                        if skipped_log is not None:
                            skipped_log.add(rank_skipped)
                    skipped = []
                    now = time.perf_counter()
                    images_per_s = window_images * env.world_size / (now - window_start)
                    for member, result in zip(members, results, strict=True):
                        if not member.read_pending_flags():
                            continue
                        record = member.record(step, result, images_per_s)
                        if monitor is not None and (step + 1) % cfg.monitor.every == 0:
                            # on every rank: a sharded teacher needs all of them for its forward
                            record.update(monitor(member.recipe.teacher.backbone, member.recipe.gram_teacher))
                        if member.log is not None:
                            member.log.log(record)
                        if member is members[0]:
                            bar.set_postfix(loss=f"{record['loss']:.3f}")
                    window_start, window_images = now, 0
                if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total:
                    for member in members:
                        member.read_pending_flags()
                        member.save(step)
                bar.update()
        finally:
            bar.close()
            for member in members:
                member.close_log()
        for member in members:
            member.finish()
        close_distributed()
        return self.run_dir
