"""Distillation: a frozen SSL-trained teacher, ViT and ConvNeXt students, the resolution scale, and
multi-student runs that equal separate single-student runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from opendino.cli import main
from opendino.data.augment import CropConfig
from opendino.data.loader import build_ssl_loader
from opendino.data.sources import open_source
from opendino.models import load_model
from opendino.recipes.distill import distillation_teacher_logits, load_distillation_teacher
from opendino.recipes.ssl import SSLRecipe, build_student
from opendino.train.config import ConfigError, load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer
from tests.conftest import torchrun_train

HEADS = {"prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16, "last_layer_std": 0.3}
TEACHER = {
    "data": {"source": "synthetic", "synthetic_n": 64, "synthetic_size": 64},
    "model": {"arch": "vit_small", "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2, "layerscale_init": 0.1}},
    "dino_head": HEADS,
    "ibot_head": HEADS,
    "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
    "optim": {"epochs": 2, "layerwise_decay": 0.9},
    "train": {"batch_size": 4, "epoch_length": 4},
    "checkpoint": {"every": 4, "keep": 2},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "schedules": {
        "lr": {"start": 0.0, "peak": 2e-3, "end": 1e-4, "warmup_epochs": 0.5},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.1},
        "teacher_temp": {"start": 0.07, "peak": 0.07, "end": 0.07},
        "momentum": {"start": 0.9, "peak": 0.9, "end": 1.0},
    },
}
SMALL = {"arch": "vit_small", "kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2, "layerscale_init": 0.1}}
MEDIUM = {"arch": "vit_small", "kwargs": {"embed_dim": 24, "depth": 2, "num_heads": 2, "layerscale_init": 0.1}}
SMALL["drop_path_rate"] = MEDIUM["drop_path_rate"] = 0.2


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    (root / "teacher.yaml").write_text(yaml.safe_dump(TEACHER))
    run = root / "run"
    Trainer(load_train_config(root / "teacher.yaml", [f"run.dir={run}"])).run()
    return run


@pytest.fixture()
def preset(tmp_path, teacher_run) -> Path:
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump({**TEACHER, "distill": {"teacher": str(teacher_run)}, "model": SMALL}))
    return path


def _values(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run)]


def _spy_on_student_masks(monkeypatch) -> tuple[list, list]:
    """The masks each student forward receives, and the calls of the EMA teacher."""
    seen_masks, ema_calls = [], []
    original = SSLRecipe.forward

    def spy(self, batch, *args, **kwargs):
        hooks = [
            self.student.backbone.register_forward_pre_hook(
                lambda _, args, kwargs: seen_masks.append(kwargs["masks"]), with_kwargs=True
            ),
            self.teacher.register_forward_pre_hook(lambda *_: ema_calls.append(1)),
        ]
        try:
            return original(self, batch, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(SSLRecipe, "forward", spy)
    return seen_masks, ema_calls


def test_the_student_learns_from_the_frozen_teacher_with_unmasked_crops(preset, teacher_run, tmp_path, monkeypatch):
    seen_masks, ema_calls = _spy_on_student_masks(monkeypatch)
    run = tmp_path / "student"
    assert main(["train", str(preset), f"run.dir={run}"]) == 0
    assert len(read_metrics(run)) == 8
    assert all(m == [None, None] for m in seen_masks)  # the student sees unmasked global crops
    assert len(seen_masks) == 8 and not ema_calls  # targets from the frozen teacher, never the student's EMA
    student = load_model(run / "teacher.safetensors")  # the exported model is the student's EMA
    assert student.embed_dim == 16
    state = torch.load(run / "checkpoints" / "step_00000007.pt", weights_only=True)
    assert state["model"]["teacher.backbone.cls_token"].shape[-1] == 16  # no copy of the frozen teacher
    teacher = load_distillation_teacher(teacher_run, build_student(load_train_config(preset)))
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_mask_student_masks_the_students_global_crops_at_the_ibot_positions(preset, tmp_path, monkeypatch):
    seen_masks, _ = _spy_on_student_masks(monkeypatch)
    assert main(["train", str(preset), f"run.dir={tmp_path / 'masked'}", "distill.mask_student=true"]) == 0
    assert len(seen_masks) == 8 and all(m[1] is None for m in seen_masks)  # local crops are never masked
    assert all(m[0] is not None and m[0].dtype == torch.bool for m in seen_masks)
    assert any(m[0].any() for m in seen_masks)


def test_prototype_counts_must_match_the_teacher_and_there_is_no_gram(preset, tmp_path):
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'bad'}", "dino_head.prototypes=32"])
    with pytest.raises(ValueError, match="dino_head: the student has 32 prototypes, the teacher 64"):
        Trainer(cfg).run()
    with pytest.raises(ConfigError, match="distillation has no Gram anchoring"):  # before anything is written
        load_train_config(preset, [f"run.dir={tmp_path / 'gram'}", "gram.enabled=true"])


def test_convnext_student_tokens_align_with_the_downscaled_teacher(preset, teacher_run, tmp_path):
    convnext = {"arch": "convnext_tiny", "kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}}
    crops = ["crops.global_size=64", "crops.local_size=32"]  # stride 32: 2 x 2 tokens
    with pytest.raises(ValueError, match="the student has 4 patch tokens per global crop but the masks have 16"):
        Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'unscaled'}", f"model={convnext}", *crops])).run()
    run = tmp_path / "convnext"
    scaled = [*crops, "crops.teacher_to_student_resolution_scale=2.0"]
    Trainer(load_train_config(preset, [f"run.dir={run}", f"model={convnext}", *scaled, "train.steps=2"])).run()
    assert load_model(run / "teacher.safetensors").family == "convnext"
    # The teacher (patch 16) sees the 64 px crops at 32 px: a 2 x 2 grid, the student's and the masks'.
    batch = next(
        iter(
            build_ssl_loader(
                open_source(source="synthetic", n=8, size=64),
                [CropConfig(64, 32, 2)],
                batch_size=4,
                teacher_to_student_resolution_scale=2.0,
            )
        )
    )
    assert batch["collated_masks"].shape == (8, 4)
    teacher = load_distillation_teacher(teacher_run, build_student(load_train_config(preset)))
    cls, patches = distillation_teacher_logits(teacher, batch, 2.0)
    assert cls.shape == (8, 64) and patches.shape == (int(batch["collated_masks"].sum()), 64)


def test_multi_student_run_equals_separate_single_student_runs(preset, tmp_path):
    multi = tmp_path / "multi"
    students = [{"name": "small", "model": SMALL}, {"name": "medium", "model": MEDIUM}]
    Trainer(load_train_config(preset, [f"run.dir={multi}", f"distill.students={students}"])).run()
    assert yaml.safe_load((multi / "config.yaml").read_text())["distill"]["students"] == students
    for name, model in (("small", SMALL), ("medium", MEDIUM)):
        single = tmp_path / f"single-{name}"
        Trainer(load_train_config(preset, [f"run.dir={single}", f"model={model}"])).run()
        assert _values(multi / name) == _values(single)  # drop path on: each student has its own stream
        a = load_model(multi / name / "teacher.safetensors").state_dict()
        b = load_model(single / "teacher.safetensors").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_starts_from_chosen_blocks_of_its_teacher(preset, teacher_run, tmp_path):
    """``init.backbone_blocks`` without ``init.backbone``: blocks of the distillation teacher's backbone."""
    half = {"arch": "vit_small", "kwargs": {**TEACHER["model"]["kwargs"], "depth": 1}}
    students = [{"name": "half", "model": half, "init": {"backbone_blocks": [1], "head_warmup_steps": 2}}]
    run = tmp_path / "from-blocks"
    Trainer(load_train_config(preset, [f"run.dir={run}", f"distill.students={students}", "train.steps=2"])).run()
    teacher = load_distillation_teacher(teacher_run).backbone.state_dict()
    student = load_model(run / "half" / "teacher.safetensors").state_dict()  # backbone frozen in warm-up
    assert all(torch.equal(v, teacher[k.replace("blocks.0.", "blocks.1.")]) for k, v in student.items())
    with pytest.raises(ConfigError, match="the blocks of what"):
        load_train_config(preset, [f"run.dir={tmp_path / 'x'}", "distill.teacher=null", "init.backbone_blocks=[0]"])
    with pytest.raises(ConfigError, match="needs a frozen distill.teacher"):
        load_train_config(preset, [f"run.dir={tmp_path / 'y'}", "distill.teacher=null", "loss.sinkhorn_iterations=0"])
    with pytest.raises(ConfigError, match="loss.sinkhorn_iterations=-1: must be 0 or more"):
        load_train_config(preset, [f"run.dir={tmp_path / 'z'}", "loss.sinkhorn_iterations=-1"])


def test_fresh_heads_are_fitted_on_a_run_folders_frozen_backbone(preset, teacher_run, tmp_path):
    """``init.backbone=RUN``: the EMA teacher backbone of a run's newest checkpoint, e.g. to refit its heads."""
    run = tmp_path / "refit"
    refit = [f"run.dir={run}", f"init.backbone={teacher_run}", "init.head_warmup_steps=2", "train.steps=2"]
    Trainer(load_train_config(preset, [*refit, "distill.teacher=null", f"model={TEACHER['model']}"])).run()
    before = load_distillation_teacher(teacher_run)
    after = load_distillation_teacher(run)
    assert all(torch.equal(v, after.backbone.state_dict()[k]) for k, v in before.backbone.state_dict().items())
    assert not torch.equal(before.dino_head.last_layer.weight, after.dino_head.last_layer.weight)


def test_students_may_only_change_their_own_sections(preset, tmp_path):
    from opendino.config import ConfigError

    students = [{"name": "a", "model": SMALL, "crops": {"global_size": 64}}]
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'x'}", f"distill.students={students}"])
    with pytest.raises(ConfigError, match=r"sets \['crops'\]: shared by all students"):
        Trainer(cfg).run()


def test_multi_student_distillation_on_two_ranks_equals_one_process(preset, tmp_path):
    students = [
        {"name": "small", "model": {**SMALL, "drop_path_rate": 0.0}},  # stochastic depth draws are per rank
        {"name": "medium", "model": {**MEDIUM, "drop_path_rate": 0.0}},
    ]
    common = [f"distill.students={students}", "train.steps=4", "loss.koleo_group_size=-1"]
    single = tmp_path / "single"
    Trainer(load_train_config(preset, [f"run.dir={single}", "train.batch_size=8", *common])).run()
    sharded = tmp_path / "sharded"
    torchrun_train(preset, sharded, "train.batch_size=4", *common)
    for name in ("small", "medium"):
        for a, b in zip(read_metrics(sharded / name), read_metrics(single / name), strict=True):
            for key in ("loss", "dino_local", "dino_global", "ibot", "koleo", "grad_norm_backbone"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, a["step"], key)
