"""How a student-teacher recipe starts when it does not resume (the ``init`` section): from an earlier
stage's run folder, from released or earlier backbone weights (optionally only some of their blocks),
and where its Gram teacher comes from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from opendino import runs
from opendino.config import ConfigError
from opendino.models.channels import fit_input_layer, input_layer
from opendino.recipes.gram import INIT_TEACHER, PEAK_TEACHER
from opendino.runs import load_backbone, newest_state, prefixed

if TYPE_CHECKING:
    from opendino.recipes.base import Recipe
    from opendino.recipes.ssl import SSLRecipe


def initialise(recipe: SSLRecipe, say: Callable[[str], None]) -> tuple[int, dict | None]:
    """Initial weights as ``init.*`` and ``gram.checkpoint`` say; returns the first step and the optimizer
    state to carry on (or None)."""
    cfg = recipe.cfg
    recipe.check_config(cfg)  # the rules of these settings, also for a recipe built in Python
    start, optimizer_state = 0, None
    if cfg.init.from_run:
        start, optimizer_state = _from_run(recipe, say)
    elif cfg.init.backbone or cfg.init.backbone_blocks is not None:
        _from_backbone(recipe, say)
    start_gram_teacher(recipe)
    return start, optimizer_state


def start_gram_teacher(recipe: Recipe) -> None:
    """A recipe's Gram teacher (``recipe.gram_teacher``, if any) from ``gram.checkpoint``, else a copy of
    the EMA teacher it follows at the start of the run (``init``: the starting backbone, ``init.backbone``,
    fitted to the model's input channels as the backbones are)."""
    if getattr(recipe, "gram_teacher", None) is None:
        return
    cfg = recipe.cfg
    if cfg.gram.checkpoint:
        source = {
            PEAK_TEACHER: lambda: str(dense_peak_file(cfg.init.from_run)),
            INIT_TEACHER: lambda: cfg.init.backbone,
        }
        source = source.get(cfg.gram.checkpoint, lambda: cfg.gram.checkpoint)()
        if cfg.gram.checkpoint == INIT_TEACHER:  # the student's own start: its blocks and fitted channels
            state = fitted_backbone_state(recipe, source, "gram.checkpoint", recipe.gram_teacher)
        else:
            state = load_backbone(source, "gram.checkpoint").state_dict()
            state = fit_input_layer(state, recipe.gram_teacher, f"gram.checkpoint={source}", cfg.init.new_channels)
        recipe.gram_teacher.load_state_dict(state)
    else:
        recipe.gram.refresh()


def dense_peak_file(from_run: str) -> Path:
    """The dense peak (train/dense_peak.py) of the run this stage continues (``init.from_run``), checked to
    be no later than that run's newest checkpoint: the stage starts there, and a later peak would come
    from steps it never saw."""
    folder = Path(from_run)
    record = runs.dense_peak_record(folder)
    if record is None:
        raise ConfigError(
            f"gram.checkpoint={PEAK_TEACHER}: {folder} has no {runs.DENSE_PEAK}; the run that reaches the peak "
            "needs monitor.every > 0 and monitor.keep_peak=true"
        )
    saved = runs.list_checkpoints(folder / runs.CHECKPOINTS)
    if saved and record["step"] > saved[-1][0]:
        raise ConfigError(
            f"the dense peak of {folder} (step {record['step']}) is later than its newest checkpoint (step "
            f"{saved[-1][0]}): it was stopped after the peak; resume it before continuing it"
        )
    return folder / runs.DENSE_PEAK


def _from_run(recipe: SSLRecipe, say: Callable[[str], None]) -> tuple[int, dict | None]:
    """This stage starts from an earlier run's newest checkpoint (``init.from_mode``)."""
    init = recipe.cfg.init
    if init.from_mode == "continue":
        return continue_run(recipe, say)
    step, state = newest_state(init.from_run, "init.from_run")
    model = {k: v for k, v in state["model"].items() if not k.startswith("gram_teacher.")}
    teacher = prefixed(model, "teacher.")
    recipe.student.load_state_dict(teacher)
    recipe.teacher.load_state_dict(teacher)
    say(f"starting from the EMA teacher of {init.from_run} (its step {step}), fresh schedule")
    return 0, None


def continue_run(recipe: Recipe, say: Callable[[str], None]) -> tuple[int, dict | None]:
    """Any recipe carries on from ``init.from_run``'s newest checkpoint: its networks, optimizer and step
    counter (a later stage of the same run: Gram anchoring after pretraining); the Gram teacher is this
    stage's own."""
    from_run = recipe.cfg.init.from_run
    step, state = newest_state(from_run, "init.from_run")
    model = {k: v for k, v in state["model"].items() if not k.startswith("gram_teacher.")}
    missing, unexpected = recipe.load_state_dict(model, strict=False)
    if unexpected or [k for k in missing if not k.startswith("gram_teacher.")]:
        raise ValueError(
            f"init.from_run={from_run} is not a run of this recipe: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    say(f"continuing {from_run} after its step {step}")
    return step + 1, state["optimizer"]


def _from_backbone(recipe: SSLRecipe, say: Callable[[str], None]) -> None:
    """Student and teacher backbones from released or earlier weights (by default, with
    ``init.backbone_blocks``, the distillation teacher's); the heads stay fresh."""
    init, teacher = recipe.cfg.init, recipe.cfg.distill.teacher
    if init.backbone:
        setting, source = "init.backbone", init.backbone
    else:  # init.backbone_blocks of the distillation teacher (check_config: one of the two is set)
        setting, source = "distill.teacher", teacher
    state = fitted_backbone_state(recipe, source, setting, say=say)
    for model in (recipe.student.backbone, recipe.teacher.backbone):
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{setting}={source} does not fit model.arch={recipe.cfg.model.arch}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    if init.backbone:
        say(f"student and teacher backbones initialised from {init.backbone}; heads fresh")


def fitted_backbone_state(
    recipe: Recipe,
    source: str,
    setting: str = "init.backbone",
    model: nn.Module | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Tensor]:
    """The weights of the backbone ``source`` (a file, a name or a run folder; ``setting`` names it in
    errors) for ``model`` (default: the recipe's student backbone): ``init.backbone_blocks`` taken, the
    input layer fitted to the model's channels by ``init.new_channels`` (said when it changes), a
    different patch size refused."""
    init = recipe.cfg.init
    model = model if model is not None else recipe.student.backbone
    name = f"{setting}={source}"
    state = load_backbone(source, setting).state_dict()
    if init.backbone_blocks is not None:
        state = select_blocks(state, init.backbone_blocks, name)
    fitted = fit_input_layer(state, model, name, init.new_channels)
    key = input_layer(state)
    if say is not None and key is not None and fitted[key].shape != state[key].shape:
        say(
            f"{name}: its {state[key].shape[1]}-channel input layer fitted to {fitted[key].shape[1]} channels "
            f"(init.new_channels={init.new_channels})"
        )
    return fitted


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
