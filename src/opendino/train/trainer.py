"""The training loop: it runs any recipe of the contract (recipes/base.py) and knows nothing else of it.

A run lives in ``run.dir`` (the run folder, runs.py). Starting a run in a folder that has checkpoints
resumes it exactly (same data, same random numbers), so a killed run continues as if it had never
stopped. Under torchrun every rank runs this loop on its share of each batch; rank 0 alone writes the run
folder. Checkpoints hold full (unsharded) states keyed by parameter name, so a run resumes on any number
of ranks. A run trains one or several members (the students of one distillation): each has its own
recipe, optimizer, schedules, random streams and sub-folder, and all are fed the same batches and the
recipe's shared pass (the forward of a frozen model that every member reads).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

# Relative imports: the package's name would be the only mention of a recipe in this file.
from .. import runs
from ..config import merge, to_dict
from ..data.pipeline import DataNeeds, DataPipeline, open_training_source
from ..models import save_model
from ..recipes import recipe_class
from ..schedules import LOOP_SCHEDULES, build_schedules, scale_lr
from .capture import CapturedStep, capture_unavailable
from .config import WHOLE_VALUES, TrainConfig, student_configs
from .dense_peak import DensePeak
from .distributed import (
    DistributedEnv,
    close_distributed,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    sum_over_ranks,
)
from .logging import MetricsLog, SkippedImagesLog
from .monitor import SCORE, DenseMonitor
from .optim import apply_schedules, build_optimizer, make_capturable, portable_state
from .parallel import parallelize
from .rng import MemberStreams
from .step import StepResult, train_step

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainingDiverged(RuntimeError):
    pass


class Member:
    """One trained network of a run: its recipe, optimizer, schedules, random streams, run folder, metrics
    and checkpoints."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, env: DistributedEnv, device: torch.device) -> None:
        self.cfg, self.run_dir, self.env, self.device = cfg, Path(run_dir), env, device
        self.ckpt_dir = self.run_dir / runs.CHECKPOINTS
        self.bad_steps, self.skipped, self.logged = 0, 0, {}
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, finite flag) not yet read on the host
        self.log: MetricsLog | None = None
        self.peak: DensePeak | None = None  # the best dense point (monitor.keep_peak)
        self.streams = MemberStreams(device)

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text)

    def build(self, resume_steps: set[int] | None) -> int:
        """Builds and restores the recipe (from this member's newest checkpoint among ``resume_steps``, or
        as the config says); returns the first step to run."""
        cfg, env = self.cfg, self.env
        previous = runs.write_config(self.run_dir, to_dict(cfg)) if env.is_main else None
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.recipe = recipe = recipe_class(cfg.train.recipe).from_config(cfg)
        # Weights are restored into the plain modules, before any wrapping; the optimizer state after it.
        resumed = runs.load_latest(self.ckpt_dir, steps=resume_steps) if resume_steps else None
        saved_streams = None
        if resumed is not None:
            step, state = resumed
            recipe.load_state_dict(state["model"])
            start, optimizer_state, saved_streams = step + 1, state["optimizer"], state["rng"]
            self.bad_steps, self.skipped = state["bad_steps"], state["skipped_images"]
            self.say(f"resuming {self.run_dir} after step {step}")
            # settings added since the run was started count at their defaults
            earlier = merge(to_dict(type(cfg)()), previous or {}, WHOLE_VALUES)
            if changed := runs.changed_settings(earlier, to_dict(cfg)):
                self.say(f"warning: resumed with settings changed since the last start: {', '.join(changed)}")
        else:
            start, optimizer_state = recipe.start_fresh(self.say)
        self.streams.start(saved_streams, cfg.train.seed, start, env.rank, env.world_size, self.say)
        recipe.to(self.device)
        parallelize(recipe, cfg.parallel, cfg.train.compile, env.world_size, self.device)
        groups = recipe.param_groups()
        self.optimizer = build_optimizer(groups, (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        trained = recipe.parallel_plan().trained
        if optimizer_state is not None:
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(trained, self.optimizer, optimizer_state, options=options)
            for live, fresh in zip(self.optimizer.param_groups, groups, strict=True):
                for key in ("frozen_until", "ramp_steps"):  # this run's config, not the saved one
                    live[key] = fresh.get(key, 0)
        self.run_step = train_step
        if cfg.train.capture:
            why = capture_unavailable(recipe, cfg, self.device, env.world_size)
            if why is not None:
                self.say(f"train.capture: {why}; the step runs eager")
            else:
                recipe.scalars_on(self.device)
                make_capturable(self.optimizer, self.device)
                self.run_step = CapturedStep(self.say)
        per_rank = cfg.train.batch_size * cfg.train.accumulate  # the images of one optimizer step
        scale = scale_lr(1.0, cfg.optim.scaling_rule, per_rank, world_size=env.world_size)
        specs = {name: cfg.schedules[name] for name in LOOP_SCHEDULES}
        self.schedules = build_schedules(specs, cfg.optim.epochs, cfg.train.epoch_length, scale)
        if env.is_main:
            self.log = MetricsLog(self.run_dir, cfg.log.tensorboard, resume_step=start)
        self.streams.leave()
        recipe.train()
        return start

    def step(self, step: int, batches: list[dict]) -> StepResult:
        """One optimizer step on the step's micro-batches (one without ``train.accumulate``)."""
        s = self.schedules
        self.streams.enter()  # its own streams: a member draws the same with or without others
        ramp = apply_schedules(self.optimizer, s["lr"][step], s["weight_decay"][step], s["last_layer_lr"][step], step)
        self.skipped += sum(len(b["skipped"]) for b in batches)
        self.logged = self.recipe.before_step(step)
        if ramp is not None:  # init.head_warmup_steps / backbone_ramp_steps: where the backbone's lr stands
            self.logged["lr_ramp"] = ramp
        result = self.run_step(self.recipe, self.optimizer, batches, step=step, clip_grad=self.cfg.optim.clip_grad)
        self.pending.append((step, result.finite))
        self.streams.leave()
        return result

    def read_pending_flags(self) -> bool:
        """Logs the skipped steps since the last read; stops on too many in a row. True if all were good."""
        flags = torch.stack([f for _, f in self.pending]).tolist() if self.pending else []
        for (s, _), good in zip(self.pending, flags, strict=True):
            self.bad_steps = 0 if good else self.bad_steps + 1
            if not good and self.log is not None:
                self.log.log({"step": s, "skipped_step": True, "loss": float("nan"), "bad_steps": self.bad_steps})
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                newest = runs.list_checkpoints(self.ckpt_dir)
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
            "lr": s["lr"][step],
            "weight_decay": s["weight_decay"][step],
            **self.logged,
            **{f"grad_norm_{k}": v.item() for k, v in result.grad_norms.items()},
            "skipped_images": sum_over_ranks(self.skipped, self.device),
            "images_per_s": images_per_s,
        }

    def save(self, step: int) -> None:
        trained = self.recipe.parallel_plan().trained
        state = {
            "step": step,
            # full states keyed by parameter name: readable by any number of ranks
            "model": get_model_state_dict(self.recipe, options=FULL_STATE),
            "optimizer": portable_state(get_optimizer_state_dict(trained, self.optimizer, options=FULL_STATE)),
            "rng": gather_objects(self.streams.state),
            "bad_steps": self.bad_steps,
            "skipped_images": sum_over_ranks(self.skipped, self.device),
            "export_prefix": self.recipe.export_prefix(),
        }
        error = None
        if self.env.is_main:
            try:
                runs.save_checkpoint(self.ckpt_dir, step, state, self.cfg.checkpoint.keep)
            except runs.CheckpointWriteError as e:
                error = e
        if sum_over_ranks(int(error is not None), self.device):  # every rank stops, not only the writer
            raise error or runs.CheckpointWriteError(f"rank 0 could not write the checkpoint of step {step}")

    def finish(self) -> None:
        """Exports the recipe's model (``runs.EXPORT`` in the run folder) and its extra exports."""
        module = self.recipe.export_module()
        crops = self.cfg.crops  # recorded in the file: what its inputs must be normalised with
        module.input_normalisation = (tuple(crops.mean), tuple(crops.std))
        weights = get_model_state_dict(module, options=FULL_STATE)
        if self.env.is_main:
            save_model(module, self.run_dir / runs.EXPORT, state=weights)
        for name, (module, writer) in self.recipe.extra_exports().items():
            weights = get_model_state_dict(module, options=FULL_STATE)
            if self.env.is_main:
                writer(module, self.run_dir / name, weights)


class Trainer:
    """Runs one configuration: its members, the shared data pipeline and the recipe's shared pass."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.check()  # a configuration built in Python is checked like one loaded from a preset
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.env, self.device = init_distributed(cfg.train.device)

    def pipeline(self, needs: DataNeeds) -> DataPipeline:
        """The data pipeline of this run, delivering what ``needs`` (the recipe's) asks for."""
        cfg, env = self.cfg, self.env
        return DataPipeline(
            cfg.data, cfg.crops, needs, cfg.train.batch_size, cfg.train.seed, env.rank, env.world_size, self.device
        )

    def _members(self) -> list[Member]:
        cfg = self.cfg
        if not cfg.distill.students:
            return [Member(cfg, self.run_dir, self.env, self.device)]
        if self.env.is_main:
            runs.write_config(self.run_dir, to_dict(cfg))
        return [Member(c, self.run_dir / name, self.env, self.device) for name, c in student_configs(cfg).items()]

    def setup(self) -> int:
        """Members built or resumed, the shared pass, the batches and the monitor; returns the first step."""
        cfg, env = self.cfg, self.env
        # first: a bad data.path (or images of another channel count) fails before anything is built
        self.source = open_training_source(cfg.data, cfg.model.in_chans)
        self.members = members = self._members()
        starts = {m.build(runs.common_steps([m.ckpt_dir for m in members])) for m in members}
        if len(starts) != 1:
            raise ValueError(f"the students would start at different steps {sorted(starts)}: check init.*")
        start = starts.pop()
        self.shared = type(members[0].recipe).shared_pass(cfg, [m.recipe for m in members])
        if self.shared is not None:
            self.shared.to(self.device)
            parallelize(self.shared, cfg.parallel, cfg.train.compile, env.world_size, self.device)
        # the data stream counts micro-batches: step s takes those of s * accumulate, ...
        needs = members[0].recipe.data_needs(self.shared)
        self.batches = self.pipeline(needs).batches(self.source, start * cfg.train.accumulate)
        self.monitor = None
        if cfg.monitor.every and cfg.monitor.dense:
            patch = getattr(members[0].recipe.export_module(), "patch_size", 16)
            size = cfg.monitor.size or cfg.crops.global_size
            self.monitor = DenseMonitor(
                size, patch, cfg.crops.mean, cfg.crops.std, cfg.monitor.n_fit, cfg.monitor.n_eval
            )
            if cfg.monitor.keep_peak:
                settings = {"size": size, "patch": patch, "n_fit": cfg.monitor.n_fit, "n_eval": cfg.monitor.n_eval}
                for m in members:
                    continued = m.cfg.init.from_run if m.cfg.init.from_mode == "continue" else None
                    m.peak = DensePeak(m.run_dir, continued, settings, m.say) if env.is_main else None
        for warning in (cfg.past_schedules_warning(), cfg.frozen_backbone_warning()):
            if warning and env.is_main:
                print(warning)
        if start >= cfg.total_steps and env.is_main:
            print(f"nothing to run: {self.run_dir} already holds steps 0-{start - 1} (train.steps={cfg.total_steps})")
        return start

    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        start = self.setup()
        bar = tqdm(
            total=cfg.total_steps,
            initial=start,
            desc="train",
            unit="step",
            # None: shown on a terminal only, so no carriage-return bars end up in log files
            disable=None if cfg.log.progress and env.is_main else True,
        )
        self.window_start, self.window_images, self.skipped = time.perf_counter(), 0, []
        self.skipped_log = SkippedImagesLog(self.run_dir) if env.is_main else None
        try:
            for step in range(start, cfg.total_steps):
                batches = [next(self.batches) for _ in range(cfg.train.accumulate)]
                for batch in batches:
                    if self.shared is not None:
                        batch.update(self.shared(batch))
                    self.skipped += batch["skipped"]
                    self.window_images += batch["labels"].shape[0]
                results = [m.step(step, batches) for m in self.members]
                last = step + 1 == cfg.total_steps
                if (step + 1) % cfg.log.every == 0 or last:
                    self.log_window(step, results, bar)
                if (step + 1) % cfg.checkpoint.every == 0 or last:
                    self.checkpoint_window(step)
                bar.update()
        finally:
            bar.close()
            for member in self.members:
                if member.log is not None:
                    member.log.close()
        for member in self.members:
            member.finish()
        close_distributed()
        return self.run_dir

    def checkpoint_window(self, step: int) -> None:
        """Every member's finite flags read (a diverged run stops before it is saved), then its checkpoint."""
        for member in self.members:
            member.read_pending_flags()
            self.write_peak(member)
            member.save(step)

    def write_peak(self, member: Member) -> None:
        """The member's held dense peak written before its checkpoint; a failed write stops every rank."""
        error = None
        if member.peak is not None:
            try:
                member.peak.write(member.recipe.monitored()[0])
            except OSError as e:
                error = e
        if self.cfg.monitor.keep_peak and sum_over_ranks(int(error is not None), self.device):
            raise error or OSError(f"rank 0 could not write the dense peak of {member.run_dir}")

    def keep_peak(self, member: Member, step: int, record: dict) -> None:
        """A new best dense score (rank 0's decides: every rank takes part in gathering a sharded state)
        is held by the member's peak until its next checkpoint."""
        beats = sum_over_ranks(int(member.peak is not None and member.peak.beats(record[SCORE])), self.device)
        if beats:
            state = get_model_state_dict(member.recipe.monitored()[0], options=FULL_STATE)
            if member.peak is not None:
                member.peak.hold(step, record[SCORE], state)

    def log_window(self, step: int, results: list[StepResult], bar: tqdm) -> None:
        """The records of a logging point: every member's metrics since the last one (on the main rank),
        the monitor's, the unreadable images of every rank, the throughput of the window."""
        for rank_skipped in gather_objects(self.skipped):
            if self.skipped_log is not None:
                self.skipped_log.add(rank_skipped)
        self.skipped = []
        now = time.perf_counter()
        images_per_s = self.window_images * self.env.world_size / (now - self.window_start)
        for member, result in zip(self.members, results, strict=True):
            if not member.read_pending_flags():
                continue
            record = member.record(step, result, images_per_s)
            if self.cfg.monitor.every and (step + 1) % self.cfg.monitor.every == 0:
                # on every rank: a sharded model needs all of them for its forward
                if self.monitor is not None:
                    record.update(self.monitor(*member.recipe.monitored()))
                    if self.cfg.monitor.keep_peak:
                        self.keep_peak(member, step, record)
                record.update(member.recipe.evaluate(step))
            if member.log is not None:
                member.log.log(record)
            if member is self.members[0]:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
        self.window_start, self.window_images = now, 0
