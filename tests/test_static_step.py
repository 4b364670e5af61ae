"""The pieces of a fixed-shape training step (issue: GPU speed): padded iBOT rows give the unpadded loss and
gradients; merged optimizer groups give the update of the per-submodule groups."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import yaml

from opendino.data.augment import CropConfig
from opendino.data.collate import collate_masks
from opendino.data.loader import build_ssl_loader
from opendino.data.masking import BlockMaskGenerator
from opendino.data.sources import open_source
from opendino.recipes.param_groups import param_groups, param_settings
from opendino.recipes.ssl import SSLRecipe
from opendino.train.config import load_train_config
from opendino.train.optim import apply_schedules, build_optimizer
from tests.test_train import TINY


def _recipe(tmp_path, **loss) -> SSLRecipe:
    spec = copy.deepcopy(TINY)
    spec["loss"] = loss
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    torch.manual_seed(0)
    return SSLRecipe(load_train_config(path)).train()


def _batches(pad: bool, rank: int, n: int = 3) -> list[dict]:
    loader = build_ssl_loader(
        open_source(source="synthetic", n=16, size=48),
        [CropConfig(32, 16, 2)],
        batch_size=4,
        rank=rank,
        world_size=2,  # this rank's crops: a masked count that changes from step to step
        pad_masks=pad,
    )
    return list(itertools.islice(iter(loader), n))


def test_padded_masked_rows_have_a_fixed_length_and_point_at_the_same_tokens():
    def draw(seed, pad):
        generator = BlockMaskGenerator(4, max_num_patches=8, seed=seed)
        return collate_masks(16, 16, generator, rows=torch.arange(0, 8), pad=pad)

    lengths, counts = set(), set()
    for seed in range(12):
        plain, padded = draw(seed, False), draw(seed, True)
        n = int(plain["n_masked_patches"])
        counts.add(n)
        lengths.add(padded["mask_indices_list"].numel())
        assert torch.equal(padded["mask_indices_list"][:n], plain["mask_indices_list"])
        assert torch.equal(padded["masks_weight"][:n], plain["masks_weight"])
        assert padded["masks_weight"][n:].eq(0).all() and int(padded["mask_valid"].sum()) == n
        assert torch.equal(padded["n_masked_patches"], plain["n_masked_patches"])
    assert len(counts) > 1 and len(lengths) == 1  # the count moves, the shape does not
    assert lengths.pop() >= max(counts)


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_padded_masked_rows_give_the_unpadded_loss_and_gradients(tmp_path, centering):
    recipe = _recipe(tmp_path, centering=centering)
    twin = copy.deepcopy(recipe)
    recipe.before_step(0), twin.before_step(0)
    padding, worst = 0, 0.0
    for plain, padded in zip(_batches(False, rank=1), _batches(True, rank=1), strict=True):
        padding += padded["mask_indices_list"].numel() - plain["mask_indices_list"].numel()
        results = []
        for r, batch in ((recipe, plain), (twin, padded)):
            torch.manual_seed(1)  # the same drop-path draws for both
            r.student.zero_grad(set_to_none=True)
            loss, terms = r(batch)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in r.student.named_parameters() if p.grad is not None}
            results.append((loss.detach(), {k: torch.as_tensor(v).detach() for k, v in terms.items()}, grads))
        (loss, terms, grads), (loss_p, terms_p, grads_p) = results
        torch.testing.assert_close(loss_p, loss, rtol=0, atol=1e-6)
        for name in terms:
            torch.testing.assert_close(terms_p[name], terms[name], rtol=0, atol=1e-6)
        assert grads.keys() == grads_p.keys()
        for name in grads:  # float32 sums over another row count: reordered, so relative to the gradient
            torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-4, atol=1e-6)
            worst = max(worst, float(((grads_p[name] - grads[name]).abs() / grads[name].abs().clamp(min=1)).max()))
    assert padding > 0
    print(f"largest gradient difference, relative to max(1, |g|): {worst:.2e}")
    if centering == "softmax":  # the EMA centres leave the padding rows out as well
        torch.testing.assert_close(twin.centers["ibot"].center, recipe.centers["ibot"].center, rtol=0, atol=1e-6)


def test_a_rank_of_padding_alone_gets_zero_targets_not_nan():
    from opendino.losses import sinkhorn_knopp

    logits = torch.randn(5, 7)
    targets = sinkhorn_knopp(logits, 0.05, valid=torch.zeros(5, dtype=torch.bool))
    assert torch.equal(targets, torch.zeros(5, 7))
    some = torch.tensor([True, True, False, True, False])
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.05, valid=some)[some], sinkhorn_knopp(logits[some], 0.05))


def test_merged_optimizer_groups_give_the_update_of_the_per_submodule_groups(tmp_path):
    recipe = _recipe(tmp_path)
    settings = param_settings(recipe.student, 0.9, 0.2)
    frozen = {"frozen_until": {"backbone": 2}, "ramp_steps": {"backbone": 3}}
    merged, separate = param_groups(settings, **frozen), param_groups(settings, merge_submodules=False, **frozen)
    assert len(merged) < len(separate)
    assert sorted(len(g["params"]) for g in merged) != sorted(len(g["params"]) for g in separate)
    keys = ("lr_multiplier", "wd_multiplier", "is_last_layer", "frozen_until", "ramp_steps")
    assert len({tuple(g[k] for k in keys) for g in merged}) == len(merged)  # one group per distinct setting
    params = [s.param for s in settings]
    start = [p.detach().clone() for p in params]
    finals = []
    for groups in (merged, separate):
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        optimizer = build_optimizer(groups)
        gen = torch.Generator().manual_seed(0)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            apply_schedules(optimizer, 1e-3, 0.04, 5e-4, step)
            optimizer.step()
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(finals[0], start, strict=True))


def test_compiled_extraction_equals_eager_with_a_short_last_batch(tmp_path):
    from PIL import Image

    from opendino.eval.features import extract_features
    from opendino.models import build_model

    torch.manual_seed(0)
    model = build_model("vits16", embed_dim=32, num_heads=2, depth=1, n_storage_tokens=0)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):  # batches of 4: the last holds one image, padded for the compiled graph
        pixels = torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8, generator=gen).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    paths = sorted(tmp_path.glob("*.png"))
    kw = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "resolution": 32, "batch_size": 4, "progress": False}
    torch._dynamo.reset()
    eager, compiled = extract_features(model, paths, **kw), extract_features(model, paths, compile=True, **kw)
    assert compiled.paths == eager.paths and compiled.cls.shape == (5, 32) and compiled.patch.shape == (5, 2, 2, 32)
    for name in ("cls", "pooled", "patch"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-4, atol=1e-5)


def _steps(recipe, optimizer, batches, capturable: bool):
    from opendino.train.optim import make_capturable
    from opendino.train.step import train_step

    if capturable:
        recipe.scalars_on(torch.device("cpu"))
        make_capturable(optimizer, torch.device("cpu"))
    records = []
    for step, batch in enumerate(batches):
        apply_schedules(optimizer, 1e-3 * (step + 1), 0.04 + 0.01 * step, 5e-4, step)
        recipe.before_step(step)
        torch.manual_seed(step)  # the same stochastic-depth draws for both
        result = train_step(recipe, optimizer, batch, step=step, clip_grad=3.0)
        records.append({"loss": result.loss, **result.terms, **result.grad_norms})
    return records


def test_the_capturable_step_state_gives_the_eager_step(tmp_path):
    """What a captured step reads from device tensors (the recipe's scalars, lr, the decoupled weight decay)
    gives the eager step's losses, norms, weights and EMA teacher over 3 steps."""
    recipe = _recipe(tmp_path, pad_masked_rows=True)
    twin = copy.deepcopy(recipe)
    start = copy.deepcopy(recipe.state_dict())
    batches = [{k: v for k, v in b.items()} for b in _batches(True, rank=0)]
    eager = _steps(recipe, build_optimizer(recipe.param_groups()), batches, capturable=False)
    optimizer = build_optimizer(twin.param_groups())
    captured = _steps(twin, optimizer, batches, capturable=True)
    assert isinstance(twin.teacher_temp, torch.Tensor) and isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # decayed outside the fused kernel
    for a, b in zip(eager, captured, strict=True):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    for (name, a), b in zip(recipe.state_dict().items(), twin.state_dict().values(), strict=True):
        # Rounding apart (lerp or t + w (s - t), the decay inside or outside the kernel), which Adam's first
        # steps turn into lr-sized differences where a gradient is near zero: 0.2-0.7 % of a tensor's own
        # change over the 3 steps, depending on the CPU. The decay itself: the test below.
        change = (a - start[name]).abs().max().item() if a.is_floating_point() else 0.0
        torch.testing.assert_close(b, a, rtol=0, atol=0.02 * change + 1e-9, msg=name)


def test_the_capturable_adamw_makes_the_update_of_the_fused_one():
    """lr in a device tensor and the weight decay applied by ``decoupled_decay_`` (what a captured step
    runs) against the fused kernel's own decay, on fixed gradients over 3 steps of changing lr and decay,
    two groups with their own multipliers, and a skipped (non-finite) step that changes nothing."""
    from opendino.train.optim import decoupled_decay_, make_capturable

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 7, generator=gen), torch.randn(11, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in weights] for _ in range(4)]

    def run(capturable: bool, decay: bool = True) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        groups = [
            {"params": [params[0]], "is_last_layer": False, "lr_multiplier": 1.0, "wd_multiplier": 1.0},
            {"params": [params[1]], "is_last_layer": True, "lr_multiplier": 0.5, "wd_multiplier": 0.0},
        ]
        optimizer = build_optimizer(groups)
        if capturable:
            make_capturable(optimizer, torch.device("cpu"))
        for step, these in enumerate(grads):
            apply_schedules(optimizer, 0.1 * (step + 1), (0.5 + step) * decay, 0.05, step)
            for p, g in zip(params, these, strict=True):
                p.grad = g.clone()
            finite = torch.tensor(step != 2)  # the third step is skipped
            optimizer.found_inf = (~finite).float()
            decoupled_decay_(optimizer, finite)
            optimizer.step()
        return [p.detach() for p in params]

    fused, captured = run(False), run(True)
    for a, b in zip(fused, captured, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert (run(False, decay=False)[0] - fused[0]).abs().max() > 0.05  # the decay is large enough to see


def test_train_capture_without_a_gpu_says_so_and_trains_eager(tmp_path, capsys):
    from opendino.train.logging import read_metrics
    from opendino.train.trainer import Trainer

    _recipe(tmp_path)  # writes tiny.yaml
    preset = tmp_path / "tiny.yaml"
    common = ["train.steps=2", "loss.pad_masked_rows=true"]
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'eager'}", *common])).run()
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'capture'}", "train.capture=true", *common])).run()
    assert "train.capture: CUDA graphs need a GPU; the step runs eager" in capsys.readouterr().out
    drop = {"images_per_s"}
    eager, captured = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "capture")
    assert [{k: v for k, v in r.items() if k not in drop} for r in captured] == [
        {k: v for k, v in r.items() if k not in drop} for r in eager
    ]
    with pytest.raises(ValueError, match="train.capture and train.compile: choose one"):
        load_train_config(preset, ["train.capture=true", "train.compile=true"])
    from opendino.train.capture import capture_unavailable

    cuda = torch.device("cuda")  # what the rule says on a GPU; nothing runs there
    recipe = _recipe(tmp_path)
    assert capture_unavailable(recipe, load_train_config(preset, []), cuda, 1) is None
    for override, why in (
        ("parallel.activation_checkpointing=selective", "activation_checkpointing"),
        ("train.accumulate=2", "accumulate"),
    ):
        assert why in capture_unavailable(recipe, load_train_config(preset, [override]), cuda, 1)
    assert "several processes" in capture_unavailable(recipe, load_train_config(preset, []), cuda, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_captured_step_equals_the_eager_step_on_a_gpu():
    """benchmarks/capture_check.py: captured against eager term by term, with stochastic depth, and a
    captured run resumed from a checkpoint against the uninterrupted one."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "capture_check.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_captured_inputs_follow_every_tensor_of_a_batch():
    from opendino.train.capture import _signature, _static_copy, _tensors

    batch = {"global": torch.randn(2, 3), "teacher_logits": (torch.randn(4, 5), torch.randn(6, 5)), "upperbound": 7}
    static = _static_copy(batch)
    assert _signature(static) == _signature(batch) and static["upperbound"] == 7
    assert len(_tensors(batch)) == 3 and static["teacher_logits"][0] is not batch["teacher_logits"][0]
    longer = {**batch, "teacher_logits": (torch.randn(4, 5), torch.randn(7, 5))}
    assert _signature(longer) != _signature(batch)  # another masked count: another graph


def test_a_run_with_the_capturable_state_resumes_exactly_and_trains_like_eager(tmp_path, monkeypatch, capsys):
    """The trainer's captured-step set-up (recipe scalars and optimizer lr / weight decay in device tensors)
    with the graph replaced by the eager step it records, as if on a GPU: its checkpoints hold and restore
    that state (in the form an eager run writes), so a run stopped after step 2 and resumed gives the
    uninterrupted metrics exactly, and both train like the eager run (rounding apart: the weight decay
    applied outside the fused kernel)."""
    from opendino.train import trainer as trainer_module
    from opendino.train.logging import read_metrics
    from opendino.train.step import train_step
    from opendino.train.trainer import Trainer

    _recipe(tmp_path)  # writes tiny.yaml
    preset = tmp_path / "tiny.yaml"
    common = ["loss.pad_masked_rows=true", "checkpoint.every=1", "train.steps=5"]

    def run(name: str, *more: str) -> list[dict]:
        Trainer(load_train_config(preset, [f"run.dir={tmp_path / name}", *common, *more])).run()
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(tmp_path / name)]

    eager = run("eager")
    monkeypatch.setattr(trainer_module, "capture_unavailable", lambda *a: None)
    monkeypatch.setattr(trainer_module, "CapturedStep", lambda say: train_step)
    whole = run("whole", "train.capture=true")
    run("stopped", "train.capture=true", "train.steps=2")
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "step_00000001.pt", weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    # written as an eager run writes them: any run, capturing or not, can carry on from it
    assert all(isinstance(g["lr"], float) and "decay" not in g and not g["capturable"] for g in groups)
    assert {g["weight_decay"] for g in groups} != {0.0}
    resumed = run("stopped", "train.capture=true")
    assert "resuming" in capsys.readouterr().out
    assert resumed == whole and len(whole) == 5
    for a, b in zip(eager, whole, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_the_gpu_capture_check_makes_its_eager_steps_on_the_cpu():
    """benchmarks/capture_check.py runs only on a GPU, where a broken batch would waste the device's time:
    its recipes and batches make finite eager steps here."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("capture_check", REPO / "benchmarks" / "capture_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for random in (False, True):
        records = check._run(check._recipe(random, "cpu"), check._batches(2, b=2, device="cpu"), False, "cpu")
        assert len(records) == 2 and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in records)
        assert {"loss", "ibot", "norm_backbone"} <= set(records[0])


def test_the_captured_ema_weight_keeps_its_precision_at_the_end_of_the_schedule(tmp_path):
    """Near the end of the momentum schedule the teacher moves by ``1 - m`` ~ 1e-5 of the difference; the
    device scalar holds that weight (computed on the host in double), not a float32 momentum, whose
    complement would be off by 0.14 % (float32(0.99999) = 0.99998999)."""
    recipe = _recipe(tmp_path)
    recipe.scalars_on(torch.device("cpu"))
    recipe.set_scalar("ema_weight", 1.0 - 0.99999)
    assert abs(recipe.ema_weight.item() / 1e-5 - 1) < 1e-6
    assert abs((1.0 - torch.tensor(0.99999)).item() / 1e-5 - 1) > 1e-3  # what a float32 momentum would give
