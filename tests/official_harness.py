"""Checks our code against golden outputs of the official implementation, one checker per fixture kind.

Each checker re-creates every call a fixture file records (the call is read from the output's key, e.g.
``gil_n2_reshape_norm_cls`` = ``get_intermediate_layers(x, n=2, reshape=True, norm=True,
return_class_token=True)``), so files of the same kind with other sizes, options or inputs work too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from opendino.config import apply_overrides, load_yaml
from opendino.data.collate import collate_masks
from opendino.data.masking import BlockMaskGenerator
from opendino.losses import (
    LossWeights,
    SoftmaxCenter,
    dino_loss,
    gram_loss,
    ibot_loss_dense,
    ibot_loss_masked,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
    total_loss,
)
from opendino.models.convnext import ConvNeXt
from opendino.models.heads import DINOHead
from opendino.models.vit import DinoVisionTransformer
from opendino.train.optim import apply_schedules, build_optimizer, param_groups, param_settings
from opendino.train.schedules import (
    ScheduleSpec,
    V1Settings,
    build_schedules_v1,
    build_schedules_v2,
    cosine_schedule,
    linear_warmup_cosine_decay,
    scale_lr,
    schedule_specs,
)
from tests.conftest import REPO

OUTPUT_ATOL = 1e-5
GRAD_TOL = 1e-5  # absolute, or relative to the largest expected magnitude when that exceeds 1


def assert_close(ours: Any, expected: Any, path: str, grad: bool = False) -> None:
    if isinstance(expected, Tensor):
        assert isinstance(ours, Tensor), f"{path}: expected a tensor, got {type(ours).__name__}"
        assert ours.shape == expected.shape, f"{path}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
        if expected.numel() == 0:
            return
        diff = (ours.detach().float() - expected.float()).abs().max().item()
        scale = max(1.0, expected.float().abs().max().item()) if grad else 1.0
        tol = (GRAD_TOL if grad else OUTPUT_ATOL) * scale
        assert diff <= tol, f"{path}: max |diff| {diff:.3g} > {tol:.3g}"
    elif isinstance(expected, dict):
        for key, value in expected.items():
            assert key in ours, f"{path}: missing output {key!r}"
            assert_close(ours[key], value, f"{path}.{key}", grad)
    elif isinstance(expected, (list, tuple)):
        assert len(ours) == len(expected), f"{path}: {len(ours)} items != {len(expected)}"
        for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
            assert_close(a, b, f"{path}[{i}]", grad)
    else:
        assert ours == expected, f"{path}: {ours!r} != {expected!r}"


_GIL = re.compile(
    r"gil_(?:n(?P<n>\d+)|layers(?P<layers>\d+(?:_\d+)*)|list(?P<list>\d+))"
    r"_(?P<shape>reshape|flat)_(?P<norm>norm|nonorm)(?P<extra>(?:_cls|_extra)*)"
)


def intermediate_call(model: torch.nn.Module, x: Tensor, key: str, expected: Any) -> Any:
    """Runs the ``get_intermediate_layers`` call that a fixture key names, shaped like ``expected``."""
    m = _GIL.fullmatch(key)
    assert m, f"unknown get_intermediate_layers key {key!r}"
    if m["n"]:
        n: int | list[int] = int(m["n"])
    elif m["layers"]:
        n = [int(i) for i in m["layers"].split("_")]
    else:
        n = [int(c) for c in m["list"]]
    suffixes = m["extra"].split("_")[1:]
    out = model.get_intermediate_layers(
        x,
        n=n,
        reshape=m["shape"] == "reshape",
        norm=m["norm"] == "norm",
        return_class_token="cls" in suffixes,
        return_extra_tokens="extra" in suffixes,
    )
    # ViT files store the cls (or storage) parts alone under `_cls` (`_extra`); ConvNeXt files store tuples.
    if suffixes and isinstance(expected[0], Tensor):
        assert len(suffixes) == 1, key
        return tuple(item[-1] for item in out)
    return out


def _run_outputs(model: torch.nn.Module, x: Tensor, expected: dict, path: str) -> None:
    for key, value in expected.items():
        if key == "forward_features":
            assert_close(model.forward_features(x), value, f"{path}.{key}")
        elif key == "forward":
            assert_close(model(x), value, f"{path}.{key}")
        elif key.startswith("gil_"):
            assert_close(intermediate_call(model, x, key, value), value, f"{path}.{key}")
        elif key.startswith("patch_size_"):
            continue  # handled by the convnext checker
        else:
            raise AssertionError(f"{path}: unknown output {key!r}")


def _vit(data: dict) -> DinoVisionTransformer:
    model = DinoVisionTransformer(**data["model_kwargs"])
    model.load_state_dict(data["state_dict"], strict=True)
    return model


@torch.no_grad()
def check_vit(data: dict) -> None:
    model = _vit(data).eval()
    for name, x in data["inputs"].items():
        _run_outputs(model, x, data["outputs"][name], f"outputs.{name}")
    for key, value in data.get("rope_eval", {}).items():
        m = re.fullmatch(r"H(\d+)W(\d+)_(sin|cos)", key)
        assert m, f"unknown rope_eval key {key!r}"
        sin, cos = model.rope_embed(int(m[1]), int(m[2]))
        assert_close(sin if m[3] == "sin" else cos, value, f"rope_eval.{key}")


def check_vit_train(data: dict) -> None:
    model = _vit(data).train()
    assert data["settings"]["drop_path_rate"] == 0
    rescale = model.rope_embed.rescale_coords
    model.rope_embed.rescale_coords = None  # the fixture switches the RoPE augmentation off except below
    inputs = data["inputs"]
    xg, xl, masks = inputs["x_global"], inputs["x_local"], inputs["masks"]
    with torch.no_grad():
        assert_close(model.forward_features(xg, masks=masks), data["single_masked"], "single_masked")
        assert_close(model.forward_features(xg), data["single_nomask_train"], "single_nomask_train")
    glob, loc = model.forward_features([xg, xl], masks=[masks, None])
    assert_close(glob, data["list_global"], "list_global")
    assert_close(loc, data["list_local"], "list_local")

    R = data["list_backward"]["R"]
    outs = {"cls": "x_norm_clstoken", "storage": "x_storage_tokens", "patch": "x_norm_patchtokens"}
    loss = sum(
        (out[key] * R[f"{prefix}_{short}"]).sum()
        for prefix, out in (("g", glob), ("l", loc))
        for short, key in outs.items()
    )
    loss.backward()
    # A sum of ~3k products: compared like gradients (relative when larger than 1).
    assert_close(loss, data["list_backward"]["loss"], "list_backward.loss", grad=True)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert_close(grads, data["list_backward"]["grads"], "list_backward.grads", grad=True)

    rope_on = data["list_rope_rescale_on"]
    model.rope_embed.rescale_coords = rescale
    torch.manual_seed(rope_on["seed"])
    with torch.no_grad():
        glob, loc = model.forward_features([xg, xl], masks=[masks, None])
    assert_close(glob, rope_on["global"], "list_rope_rescale_on.global")
    assert_close(loc, rope_on["local"], "list_rope_rescale_on.local")


@torch.no_grad()
def check_convnext(data: dict) -> None:
    models: dict[int | None, ConvNeXt] = {}

    def model_with(patch_size: int | None) -> ConvNeXt:
        if patch_size not in models:
            models[patch_size] = ConvNeXt(**{**data["model_kwargs"], "patch_size": patch_size}).eval()
            models[patch_size].load_state_dict(data["state_dict"], strict=True)
        return models[patch_size]

    for name, x in data["inputs"].items():
        expected = data["outputs"][name]
        _run_outputs(model_with(data["model_kwargs"].get("patch_size")), x, expected, f"outputs.{name}")
        for key, group in expected.items():
            if key.startswith("patch_size_"):
                size = key.removeprefix("patch_size_")
                _run_outputs(model_with(None if size == "None" else int(size)), x, group, f"outputs.{name}.{key}")


def _check_head(kwargs: dict, state: dict, inputs: dict, expected: dict, path: str) -> None:
    head = DINOHead(**kwargs)
    head.load_state_dict(state, strict=True)
    x, z, R = inputs["x"], inputs["z"], inputs["R"]
    calls: dict[str, Callable[[], Tensor]] = {
        "forward": lambda: head(x),
        "no_last_layer": lambda: head(x, no_last_layer=True),
        "mlp_prenorm": lambda: head.mlp(x),
        "only_last_layer_on_no_last_layer": lambda: head(head(x, no_last_layer=True), only_last_layer=True),
        "only_last_layer_on_z": lambda: head(z, only_last_layer=True),
    }
    with torch.no_grad():
        for key, fn in calls.items():
            if key in expected:
                assert_close(fn(), expected[key], f"{path}.{key}")
    if "backward" in expected:
        xg = x.clone().requires_grad_(True)
        loss = (head(xg) * R).sum()
        loss.backward()
        ref = expected["backward"]
        assert_close(loss, ref["loss"], f"{path}.backward.loss", grad=True)
        assert_close(xg.grad, ref["grad_x"], f"{path}.backward.grad_x", grad=True)
        grads = {name: p.grad for name, p in head.named_parameters()}
        assert_close(grads, ref["grads"], f"{path}.backward.grads", grad=True)
    unknown = set(expected) - set(calls) - {"backward"}
    assert not unknown, f"{path}: unknown outputs {sorted(unknown)}"


def check_dino_head(data: dict) -> None:
    _check_head(data["model_kwargs"], data["state_dict"], data["inputs"], data["outputs"], "outputs")
    for name, variant in data.get("variants", {}).items():
        expected = {k: v for k, v in variant.items() if k not in ("head_kwargs", "state_dict") and "seed" not in k}
        _check_head(variant["head_kwargs"], variant["state_dict"], data["inputs"], expected, f"variants.{name}")


def check_masking(data: dict) -> None:
    # Our generator owns its random streams; seeded like the official global ones, the masks are identical
    # (positions included, which is stricter than the counts and structure the fixture asks for).
    for i, case in enumerate(data["cases"]):
        gen = BlockMaskGenerator(
            tuple(case["input_size"]),
            max_num_patches=case["max_num_patches"],
            min_num_patches=case["min_num_patches"],
            min_aspect=case["min_aspect"],
            max_aspect=case["max_aspect"],
            seed=case["seed"],
        )
        masks = torch.stack([torch.from_numpy(gen(n)) for n in case["counts_in_call_order"]])
        counts = masks.flatten(1).sum(1).tolist()
        assert counts == list(case["counts_in_call_order"]), f"cases[{i}]: counts {counts}"
        assert torch.equal(masks, case["masks"]), f"cases[{i}]: mask positions differ"
    for i, case in enumerate(data.get("collate_cases", [])):
        side = math.isqrt(case["n_tokens"])
        gen = BlockMaskGenerator((side, side), max_num_patches=0.5 * case["n_tokens"], seed=case["seed"])
        out = collate_masks(case["B"] * case["n_global_crops"], case["n_tokens"], gen)
        assert out["upperbound"] == case["upperbound"], f"collate_cases[{i}].upperbound"
        for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
            assert torch.equal(out[key], case[key]), f"collate_cases[{i}].{key} differs"


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def check_losses(data: dict) -> None:
    c, inp = data["constants"], data["inputs"]
    n_global, n_local, B = c["n_global_crops"], c["n_local_crops"], c["B"]
    masks = data["collate"]["collated_masks"]
    for key, ref in data["dino"].items():
        if key == "softmax_center":
            center = SoftmaxCenter(c["K_dino"], momentum=c["center_momentum"])
            center.center.copy_(inp["center_dino"])
            assert_close(center.probs(inp["teacher_cls_logits"], 0.07), ref["probs_T0.07"], "dino.softmax_center")
            center.update(inp["teacher_cls_logits"])
            assert_close(center.center, ref["center_after_update"], "dino.softmax_center.center_after_update")
            continue
        T = float(key.removeprefix("T"))
        n_iter = c["sinkhorn_knopp_n_iterations"]
        centred = sinkhorn_knopp(inp["teacher_cls_logits"], T, n_iter).unflatten(0, (n_global, B))
        assert_close(centred, ref["sk_centered"], f"dino.{key}.sk_centered")
        sg, sl = _leaf(inp["student_global_logits"]), _leaf(inp["student_local_logits"])
        local = dino_loss(sl, centred, c["student_temp"])
        glob = dino_loss(sg, centred, c["student_temp"], ignore_diagonal=True)
        assert_close(local, ref["local_loss"], f"dino.{key}.local_loss")
        assert_close(glob, ref["global_loss_ignore_diagonal"], f"dino.{key}.global_loss_ignore_diagonal")
        no_ignore = dino_loss(sg, centred, c["student_temp"])
        assert_close(no_ignore, ref["global_loss_no_ignore"], f"dino.{key}.global_loss_no_ignore")
        (local + glob).backward()
        assert_close(sg.grad, ref["grad_student_global_of_local_plus_global"], f"dino.{key}.grad_global", grad=True)
        assert_close(sl.grad, ref["grad_student_local_of_local_plus_global"], f"dino.{key}.grad_local", grad=True)

    weights = data["collate"]["masks_weight"]
    n_masked = data["collate"]["n_masked_patches"]
    for key, ref in data["ibot"].items():
        if key == "dense_forward":
            loss = ibot_loss_dense(inp["student_patch_dense"], inp["teacher_patch_dense"], masks, c["student_temp"])
            assert_close(loss, ref["loss"], "ibot.dense_forward.loss")
            continue
        if not key.startswith("T"):
            continue  # notes such as the compiled-vs-eager difference of the official module
        T = float(key.removeprefix("T"))
        centred = sinkhorn_knopp(inp["teacher_patch_logits"], T, c["sinkhorn_knopp_n_iterations"], n_samples=n_masked)
        assert_close(centred, ref["sk_centered"], f"ibot.{key}.sk_centered")
        student = _leaf(inp["student_patch_logits"])
        loss = ibot_loss_masked(student, centred, masks, weights, c["student_temp"])
        assert_close(loss, ref["loss_forward_masked"], f"ibot.{key}.loss_forward_masked")
        default = ibot_loss_masked(student, centred, masks, None, c["student_temp"])
        assert_close(default, ref["loss_forward_masked_default_weights"], f"ibot.{key}.default_weights")
        loss.backward()
        assert_close(student.grad, ref["grad_student_patch_logits"], f"ibot.{key}.grad", grad=True)

    ref = data["koleo"]
    x = _leaf(inp["koleo_x"])
    per_crop = [koleo_loss(x[i]) for i in range(x.shape[0])]
    assert_close(per_crop, ref["per_crop"], "koleo.per_crop")
    mean = sum(per_crop) / len(per_crop)
    assert_close(mean, ref["ssl_mean_over_global_crops"], "koleo.ssl_mean_over_global_crops")
    mean.backward()
    assert_close(x.grad, ref["grad_koleo_x"], "koleo.grad_koleo_x", grad=True)
    assert_close(koleo_loss_distributed(inp["koleo_x"][0]), ref["distributed_topk1_world1"], "koleo.distributed")

    for key, ref in data["gram"].items():
        student = _leaf(inp["gram_student"])
        ctor = ref["ctor"]
        loss = gram_loss(
            student,
            inp["gram_teacher"],
            normalize=ctor["apply_norm"],
            img_level=ref["img_level"],
            remove_neg=ctor["remove_neg"],
            remove_only_teacher_neg=ctor["remove_only_teacher_neg"],
        )
        assert_close(loss, ref["loss"], f"gram.{key}.loss", grad=True)
        loss.backward()
        assert_close(student.grad, ref["grad_student"], f"gram.{key}.grad_student", grad=True)

    for key, ref in data.items():
        if not key.startswith("compute_losses_T"):
            continue
        T = float(key.removeprefix("compute_losses_T"))
        t = ref["terms"]
        w = c["loss_weights"]
        centred = sinkhorn_knopp(inp["teacher_cls_logits"], T, c["sinkhorn_knopp_n_iterations"]).unflatten(
            0, (n_global, B)
        )
        ibot_t = sinkhorn_knopp(inp["teacher_patch_logits"], T, c["sinkhorn_knopp_n_iterations"], n_samples=n_masked)
        terms = dict(
            dino_local=dino_loss(inp["student_local_logits"], centred, c["student_temp"]),
            dino_global=dino_loss(inp["student_global_logits"], centred, c["student_temp"], ignore_diagonal=True),
            koleo=sum(koleo_loss(x) for x in inp["koleo_x"]) / n_global,
            ibot=ibot_loss_masked(inp["student_patch_logits"], ibot_t, masks, weights, c["student_temp"]),
            gram=gram_loss(inp["gram_student"], inp["gram_teacher"], img_level=False),
        )
        total = total_loss(
            LossWeights(w["dino"], w["koleo"], w["ibot"], w["dino_global_ignore_diagonal"]),
            n_global,
            n_local,
            dino_local_weight=t["dino_local_loss_weight"],
            gram_weight=t["gram_loss_weight"],
            **terms,
        )
        assert_close(total, ref["total"], f"{key}.total", grad=True)
        names = {"dino_local": "dino_local_crops_loss", "dino_global": "dino_global_crops_loss"}
        for name, value in terms.items():
            assert_close(value, t[names.get(name, f"{name}_loss")], f"{key}.terms.{name}")


# The v2 entries are the official stage configs; ours are the presets in configs/stages.
STAGE_PRESETS = {"pretrain": "pretrain", "gram_anchor": "gram", "high_res_adapt": "hires"}
OFFICIAL_KEY_NAMES = {
    "train.OFFICIAL_EPOCH_LENGTH": "train.epoch_length",
    "train.batch_size_per_gpu": "train.batch_size",
}


def _stage_schedules(preset: str, overrides=(), divide_epochs_by: int = 1, world_size: int = 1):
    cfg = load_yaml(REPO / "configs" / "stages" / f"{preset}.yaml")
    renamed = []
    for item in overrides:
        key, _, value = item.partition("=")
        renamed.append(f"{OFFICIAL_KEY_NAMES.get(key, key)}={value}")
    cfg = apply_overrides(cfg, renamed)
    specs = schedule_specs(cfg["schedules"])
    epochs = cfg["optim"]["epochs"]
    if divide_epochs_by > 1:
        div = lambda e: e // divide_epochs_by if e is not None and e % divide_epochs_by == 0 else e  # noqa: E731
        epochs = div(epochs)
        for spec in specs.values():
            spec.warmup_epochs, spec.cosine_epochs = div(spec.warmup_epochs), div(spec.cosine_epochs)
            spec.freeze_last_layer_epochs = div(spec.freeze_last_layer_epochs)
    scale = scale_lr(1.0, cfg["optim"]["scaling_rule"], cfg["train"]["batch_size"], world_size)
    return epochs, build_schedules_v2(specs, epochs, cfg["train"]["epoch_length"], scale)


def check_schedules(data: dict) -> None:
    for name, case in data["cosine_scheduler_direct"].items():
        sched = cosine_schedule(**case["kwargs"])
        assert_close(torch.from_numpy(sched.values), case["schedule"], f"cosine_scheduler_direct.{name}")
        indexed = torch.tensor([sched[i] for i in range(len(case["indexed"]))], dtype=torch.float64)
        assert_close(indexed, case["indexed"], f"cosine_scheduler_direct.{name}.indexed")
    for name, case in data["linear_warmup_cosine_decay_direct"].items():
        array = torch.from_numpy(linear_warmup_cosine_decay(**case["kwargs"]))
        assert_close(array, case["array"], f"linear_warmup_cosine_decay_direct.{name}")
    for name, case in data["v1"].items():
        o, t = case["cfg_optim"], case["cfg_teacher"]
        settings = V1Settings(
            o["epochs"],
            o["lr"],
            o["min_lr"],
            o["warmup_epochs"],
            o["weight_decay"],
            o["weight_decay_end"],
            t["momentum_teacher"],
            t["final_momentum_teacher"],
            t["warmup_teacher_temp"],
            t["teacher_temp"],
            t["warmup_teacher_temp_epochs"],
            o["freeze_last_layer_epochs"],
            o["schedule_trunc_extra"],
        )
        scaled = scale_lr(case["lr_before_scaling"], o["scaling_rule"], case["batch_size_per_gpu"], case["world_size"])
        assert abs(scaled - case["lr_after_scaling"]) < 1e-15, f"v1.{name}.lr_after_scaling"
        schedules = build_schedules_v1(settings, case["OFFICIAL_EPOCH_LENGTH"])
        for key, expected in case["schedule"].items():
            ours = getattr(schedules, key)
            assert_close(torch.from_numpy(ours.values), expected, f"v1.{name}.schedule.{key}")
            indexed = torch.tensor([ours[i] for i in range(len(case["indexed"][key]))], dtype=torch.float64)
            assert_close(indexed, case["indexed"][key], f"v1.{name}.indexed.{key}")
        if o["schedule_trunc_extra"] == 0:  # the `shape: v1` specs of the presets give the same values
            v1 = {"shape": "v1"}
            specs = {
                "lr": ScheduleSpec(0.0, o["lr"], o["min_lr"], o["warmup_epochs"], **v1),
                "weight_decay": ScheduleSpec(o["weight_decay"], o["weight_decay"], o["weight_decay_end"], **v1),
                "momentum": ScheduleSpec(
                    t["momentum_teacher"], t["momentum_teacher"], t["final_momentum_teacher"], **v1
                ),
                "teacher_temp": ScheduleSpec(
                    t["warmup_teacher_temp"],
                    t["teacher_temp"],
                    t["teacher_temp"],
                    t["warmup_teacher_temp_epochs"],
                    **v1,
                ),
            }
            specs["lr"].freeze_last_layer_epochs = o["freeze_last_layer_epochs"]
            from_specs = build_schedules_v2(specs, o["epochs"], case["OFFICIAL_EPOCH_LENGTH"], 1.0)
            for key, expected in case["indexed"].items():
                ours = getattr(from_specs, key)
                indexed = torch.tensor([ours[i] for i in range(len(expected))], dtype=torch.float64)
                assert_close(indexed, expected, f"v1.{name}.specs.{key}")
    for name, case in data["v2"].items():
        stage = re.sub(r"_(L\d+|div\d+_L\d+)$", "", name)
        divide = int(m[1]) if (m := re.search(r"_div(\d+)_", name)) else 1
        overrides = [
            f"train.epoch_length={case['OFFICIAL_EPOCH_LENGTH']}",
            f"train.batch_size={case['batch_size_per_gpu']}",
            f"optim.scaling_rule={case['scaling_rule']}",
        ]
        epochs, schedules = _stage_schedules(STAGE_PRESETS[stage], overrides, divide, case["world_size"])
        assert epochs == case["epochs"], f"v2.{name}: {epochs} epochs != {case['epochs']}"
        for key, expected in case["arrays"].items():
            assert_close(torch.from_numpy(getattr(schedules, key).values), expected, f"v2.{name}.{key}")
    for i, case in enumerate(data["scaling"]["v1"]):
        lr = scale_lr(case["lr_before"], case["rule"], case["batch_size_per_gpu"], case["world_size"])
        assert abs(lr - case["lr_after"]) <= 1e-12 * max(1.0, abs(case["lr_after"])), f"scaling.v1[{i}]"
    for i, case in enumerate(data["scaling"]["v2"]):
        _, schedules = _stage_schedules("pretrain", case["opts"], world_size=case["world_size"])
        assert_close(torch.from_numpy(schedules.lr.values), case["lr"], f"scaling.v2[{i}].lr")
        assert_close(torch.from_numpy(schedules.last_layer_lr.values), case["last_layer_lr"], f"scaling.v2[{i}].ll")


def check_param_groups(data: dict) -> None:
    backbone = DinoVisionTransformer(**data["model_kwargs"])
    heads = {name: DINOHead(**kw) for name, kw in data["head_kwargs"].items()}
    student = {"backbone": backbone, **heads}
    student = {name: student[name] for name in data.get("student_order", list(student))}
    for case_name, case in data["cases"].items():
        optim = case["optim"]
        settings = param_settings(student, optim["layerwise_decay"], optim["patch_embed_lr_mult"])
        where = f"cases.{case_name}"
        if not optim["multi_tensor_optim"]:
            ours = [(s.name, s.lr_multiplier, s.wd_multiplier, s.is_last_layer) for s in settings]
            ref = [(g["param"], g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in case["groups"]]
            assert [o[0] for o in ours] == [r[0] for r in ref], f"{where}: parameter order differs"
            for o, r in zip(ours, ref, strict=True):
                assert abs(o[1] - r[1]) < 1e-12 and o[2:] == r[2:], f"{where}.{o[0]}: {o[1:]} != {r[1:]}"
        else:
            groups = param_groups(settings, fuse=True)
            assert len(groups) == len(case["groups"]), f"{where}: {len(groups)} groups != {len(case['groups'])}"
            for i, (g, r) in enumerate(zip(groups, case["groups"], strict=True)):
                assert g["names"] == list(r["params"]), f"{where}.groups[{i}] params"
                assert abs(g["lr_multiplier"] - r["lr_multiplier"]) < 1e-12, f"{where}.groups[{i}].lr_multiplier"
                assert (g["wd_multiplier"], g["is_last_layer"]) == (r["wd_multiplier"], r["is_last_layer"])
        applied = case.get("apply_optim_scheduler")
        if applied:
            lr, wd, last = 2e-3, 0.05, 1e-3  # the recorded call
            assert "lr=2e-3, wd=0.05, last_layer_lr=1e-3" in applied["call"], applied["call"]
            optimizer = build_optimizer(param_groups(settings, fuse=False), tuple(applied["betas"]))
            apply_schedules(optimizer, lr, wd, last)
            for group in optimizer.param_groups:
                for name in group["names"]:
                    ref = applied["per_param"][name]
                    assert (
                        abs(group["lr"] - ref["lr"]) < 1e-15
                        and abs(group["weight_decay"] - ref["weight_decay"]) < 1e-15
                    ), name


CHECKERS: dict[str, Callable[[dict], None]] = {
    "vit": check_vit,
    "vit_train": check_vit_train,
    "convnext": check_convnext,
    "dino_head": check_dino_head,
    "masking": check_masking,
    "losses": check_losses,
    "schedules": check_schedules,
    "param_groups": check_param_groups,
}


def check_file(path) -> None:
    """Loads a fixture file and runs the checker of its kind; an unknown kind is a failure."""
    data = torch.load(path, weights_only=True, map_location="cpu")
    kind = data.get("kind")
    assert kind in CHECKERS, f"{path}: no checker for kind {kind!r}; known: {sorted(CHECKERS)}"
    CHECKERS[kind](data)
