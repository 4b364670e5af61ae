"""Checks our code against golden outputs of the official implementation: one checker per fixture ``kind``
(the fixtures' README), which re-creates every output a file records.

What an output means is read from the file, not from a list of known names:

- the recorded official call (``calls``): ``model.get_intermediate_layers(x, n=2, reshape=True, norm=True)``,
  ``same with n=[1, 3]``, ``model.forward_features([x_global, x_local], masks=[masks, None]) -> [global, local]``
  and ``apply_optim_scheduler(opt, lr=2e-3, ...)`` are parsed and re-run on our objects, whose API mirrors
  the official one;
- stored arguments: constructor kwargs, Gram ``ctor`` flags, schedule ``kwargs``, official configs and their
  ``opts`` (applied to our stage presets), parameter-group ``optim`` settings;
- the key grammar where nothing else records it: ``T0.04`` / ``probs_T0.04`` = teacher temperature 0.04,
  ``gil_list13_reshape_norm_cls`` = ``get_intermediate_layers(x, n=[1, 3], reshape=True, norm=True,
  return_class_token=True)`` (checked against the recorded call when there is one), ``H3W5_sin``,
  ``patch_size_16``, ``distributed_topk1_world1``.

Every value of a file must be interpreted. A key of a family that cannot be read is an error naming it, and
after a checker ran, any value that no check compared, used as an input or setting, or marked as
documentation fails the file with its path: a new fixture key cannot pass by being skipped.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import math
import re
from collections.abc import Callable, Iterator
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
from opendino.recipes.param_groups import param_groups, param_settings
from opendino.schedules import (
    Schedule,
    ScheduleSpec,
    build_schedules,
    cosine_schedule,
    linear_warmup_cosine_decay,
    scale_lr,
    schedule_specs,
)
from opendino.train.optim import apply_schedules, build_optimizer
from tests.conftest import REPO
from tests.official_schedules import V1Settings, build_schedules_v1

OUTPUT_ATOL = 1e-5
GRAD_TOL = 1e-5  # absolute, or relative to the largest expected magnitude when that exceeds 1
# float64 arrays (the schedules, computed in float64 by both codes): relative to their largest magnitude. An
# absolute 1e-5 would let learning rates of 1e-5 be off by 40%.
FLOAT64_RTOL = 1e-12


def assert_close(ours: Any, expected: Any, path: str, grad: bool = False) -> None:
    if isinstance(expected, Tensor):
        assert isinstance(ours, Tensor), f"{path}: expected a tensor, got {type(ours).__name__}"
        assert ours.shape == expected.shape, f"{path}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
        if expected.numel() == 0:
            return
        if expected.dtype == torch.float64:
            diff = (ours.detach().double() - expected).abs().max().item()
            tol = FLOAT64_RTOL * expected.abs().max().item()
        else:
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


def assert_float(ours: float, expected: float, path: str, rel: float = 1e-12) -> None:
    """Scalars computed in float64 (schedules, multipliers, learning rates): relative to their magnitude."""
    assert abs(ours - expected) <= rel * abs(expected), f"{path}: {ours!r} != {expected!r}"


# ------------------------------------------------------------------------------------------------------
# The fixture tree: navigation, and a record of what was interpreted

# Documentation and provenance: top-level sections, seeds of already stored inputs and weights, and free text.
DOC_SECTIONS = {"provenance", "calls", "kind"}
DOC_ANY = {"input_seed", "init_seed", "perturb_seed"}
DOC_TEXT = {"call", "constructor", "notes", "state_dict_notes", "rng", "formula", "seeds", "model"}


class Node:
    """A value of a fixture file and its path. ``value`` (read as an input or setting), ``close`` / ``equal``
    (compared) and ``doc`` (documentation) mark it and everything below it as interpreted."""

    def __init__(self, raw: Any, path: tuple = (), seen: set[tuple] | None = None) -> None:
        self.raw, self.path = raw, path
        self.seen = set() if seen is None else seen

    @property
    def where(self) -> str:
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
        return text or "<file>"

    def __getitem__(self, key: str | int) -> Node:
        if isinstance(self.raw, dict):
            assert key in self.raw, f"{self.where}: no {key!r} (has {', '.join(map(str, self.raw))})"
        elif isinstance(self.raw, (list, tuple)):
            assert isinstance(key, int) and -len(self.raw) <= key < len(self.raw), f"{self.where}: no [{key}]"
        else:
            raise AssertionError(f"{self.where}: a {type(self.raw).__name__}, not a mapping or list")
        return Node(self.raw[key], (*self.path, key), self.seen)

    def __contains__(self, key: str) -> bool:
        return isinstance(self.raw, dict) and key in self.raw

    def items(self) -> list[tuple[Any, Node]]:
        if isinstance(self.raw, dict):
            return [(key, self[key]) for key in self.raw]
        assert isinstance(self.raw, (list, tuple)), f"{self.where}: a {type(self.raw).__name__}, not a mapping"
        return [(i, self[i]) for i in range(len(self.raw))]

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def value(self) -> Any:
        self.seen.add(self.path)
        return self.raw

    def close(self, ours: Any, grad: bool = False) -> None:
        assert_close(ours, self.raw, self.where, grad)
        self.seen.add(self.path)

    def float(self, ours: float, rel: float = 1e-12) -> None:
        assert_float(ours, self.raw, self.where, rel)
        self.seen.add(self.path)

    def equal(self, ours: Any) -> None:
        if isinstance(self.raw, Tensor):
            assert isinstance(ours, Tensor) and ours.shape == self.raw.shape, f"{self.where}: shape differs"
            assert torch.equal(ours, self.raw.to(ours.dtype)), f"{self.where} differs"
        else:
            assert ours == self.raw, f"{self.where}: {ours!r} != {self.raw!r}"
        self.seen.add(self.path)

    def doc(self) -> None:
        self.seen.add(self.path)

    def uninterpreted(self) -> list[str]:
        """Paths of the values below this node that nothing interpreted."""
        return [Node(None, path).where for path, raw in _leaves(self.raw, self.path) if not self._covered(path, raw)]

    def _covered(self, path: tuple, raw: Any) -> bool:
        if any(path[:i] in self.seen for i in range(len(path) + 1)):
            return True
        if path and (path[0] in DOC_SECTIONS or any(p in DOC_ANY for p in path if isinstance(p, str))):
            return True
        return bool(path) and path[-1] in DOC_TEXT and isinstance(raw, str)


def _leaves(raw: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    if isinstance(raw, dict) and raw:
        for key, value in raw.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(raw, (list, tuple)) and any(isinstance(v, (dict, list, tuple, Tensor)) for v in raw):
        for i, value in enumerate(raw):
            yield from _leaves(value, (*path, i))
    else:
        yield path, raw


def unknown(node: Node, what: str, known: str) -> AssertionError:
    return AssertionError(f"{node.where}: cannot interpret {what} {node.path[-1]!r}; known: {known}")


def temperature(key: str, prefix: str, node: Node) -> float:
    """The teacher temperature a key names: ``T0.07``, ``probs_T0.04``, ``compute_losses_T1e-1``."""
    m = re.fullmatch(re.escape(prefix) + r"T(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", key)
    if not m:
        raise unknown(node, "key", f"{prefix}T<temperature>")
    return float(m[1])


# ------------------------------------------------------------------------------------------------------
# Recorded official calls

INPUT = object()  # stands for the input tensor in a recorded call


def parse_call(text: str, function: str) -> ast.Call | None:
    """The first ``function(...)`` call written in ``text`` (free text around it is ignored)."""
    m = re.search(rf"(?<![\w]){re.escape(function)}\(", text)
    if not m:
        return None
    depth, start = 0, m.end() - 1
    for end in range(start, len(text)):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return ast.parse("f" + text[start : end + 1], mode="eval").body
    raise AssertionError(f"unbalanced call {function}(...) in {text!r}")


def evaluate(node: ast.expr, names: dict[str, Any]) -> Any:
    """Literals, lists and the given names: all a recorded call uses."""
    if isinstance(node, ast.Name):
        assert node.id in names, f"recorded call uses {node.id!r}; known names: {', '.join(names)}"
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [evaluate(e, names) for e in node.elts]
    return ast.literal_eval(node)


def call_arguments(call: ast.Call, names: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    assert all(k.arg for k in call.keywords), f"recorded call with **kwargs: {ast.unparse(call)}"
    return [evaluate(a, names) for a in call.args], {k.arg: evaluate(k.value, names) for k in call.keywords}


def same_with(text: str) -> dict[str, Any] | None:
    """``same with n=[1, 3] (comment)`` -> ``{"n": [1, 3]}``: the previous call with these arguments."""
    m = re.match(r"same with (.*?)(?:\s+\(|\s*->|;|$)", text)
    if not m:
        return None
    return call_arguments(ast.parse(f"f({m[1]})", mode="eval").body, {})[1]


def described_keys(name: str) -> list[str]:
    """The keys a ``calls`` entry describes: ``gil_n2_reshape_norm_cls/extra`` -> ``..._cls``, ``..._extra``."""
    first, *alternatives = name.split("/")
    stem = first.rsplit("_", 1)[0]
    return [first, *(f"{stem}_{alt}" for alt in alternatives)]


def recorded_entry(calls: dict, key: str) -> tuple[str, str] | None:
    """The ``calls`` entry of a key: its own, else one whose name is a pattern (``list_*``) matching it."""
    for name, text in calls.items():
        if isinstance(text, str) and key in described_keys(name):
            return name, text
    for name, text in calls.items():
        if isinstance(text, str) and "*" in name and fnmatch.fnmatchcase(key, name):
            return name, text
    return None


# -- get_intermediate_layers ------------------------------------------------------------------------------

_GIL_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(DinoVisionTransformer.get_intermediate_layers).parameters.items()
    if p.default is not inspect.Parameter.empty
}  # the official defaults, which ours mirror (n=1, reshape=False, ..., norm=True)
_GIL_KEY = re.compile(
    r"gil_(?:n(?P<n>\d+)|layers(?P<layers>\d+(?:_\d+)*)|list(?P<list>\d+))"
    r"_(?P<shape>reshape|flat)_(?P<norm>norm|nonorm)(?P<parts>(?:_cls|_extra)*)"
)
_PART_ARGUMENT = {"cls": "return_class_token", "extra": "return_extra_tokens"}


def recorded_intermediate_calls(calls: dict) -> dict[str, dict[str, Any]]:
    """Keyword arguments of every recorded ``get_intermediate_layers`` call, by the keys it describes."""
    found: dict[str, dict[str, Any]] = {}
    previous = None
    for name, text in calls.items():
        if not isinstance(text, str):
            continue
        call = parse_call(text, "get_intermediate_layers")
        if call is not None:
            args, kwargs = call_arguments(call, {"x": INPUT})
            assert args == [INPUT], f"calls.{name}: expected get_intermediate_layers(x, **kwargs), got {text!r}"
            previous = kwargs
        elif previous is not None and (changes := same_with(text)) is not None:
            previous = {**previous, **changes}
        else:
            continue
        unknown_args = set(previous) - set(_GIL_DEFAULTS)
        assert not unknown_args, f"calls.{name}: get_intermediate_layers has no arguments {sorted(unknown_args)}"
        for key in described_keys(name):
            found[key] = dict(previous)
    return found


def intermediate_arguments(key: str, recorded: dict[str, dict]) -> tuple[dict[str, Any], list[str]]:
    """The call behind an output key and the parts of each returned item the key names (``cls``, ``extra``)."""
    m = _GIL_KEY.fullmatch(key)
    from_key, parts = None, []
    if m:
        if m["n"]:
            n: int | list[int] = int(m["n"])
        elif m["layers"]:
            n = [int(i) for i in m["layers"].split("_")]
        else:
            n = [int(c) for c in m["list"]]
        parts = m["parts"].split("_")[1:]
        from_key = dict(n=n, reshape=m["shape"] == "reshape", norm=m["norm"] == "norm")
        from_key.update({_PART_ARGUMENT[p]: True for p in parts})
    kwargs = recorded.get(key)
    if kwargs is None and from_key is None:
        raise AssertionError(
            f"{key!r}: no recorded get_intermediate_layers call in `calls`, and not of the form "
            "gil_<n2|layers0_1|list13>_<reshape|flat>_<norm|nonorm>[_cls][_extra]"
        )
    if kwargs is not None and from_key is not None:  # both: they must agree
        full = {**_GIL_DEFAULTS, **kwargs}
        for arg, value in from_key.items():
            assert full[arg] == value, f"{key!r}: the key says {arg}={value!r}, its recorded call {arg}={full[arg]!r}"
    return (kwargs if kwargs is not None else from_key), parts


def run_intermediate(model: torch.nn.Module, x: Tensor, key: str, expected: Any, recorded: dict) -> Any:
    kwargs, parts = intermediate_arguments(key, recorded)
    out = model.get_intermediate_layers(x, **kwargs)
    full = {**_GIL_DEFAULTS, **kwargs}
    returned = ["patches"] + [p for p, arg in _PART_ARGUMENT.items() if full[arg]]
    if len(returned) > 1 and isinstance(expected, (list, tuple)) and expected and isinstance(expected[0], Tensor):
        # The file stores one part of each returned (patches, cls, extra) tuple: the one its key names.
        assert len(parts) == 1, f"{key!r} stores one of {returned} per layer but names {parts or 'none'}"
        return tuple(item[returned.index(parts[0])] for item in out)
    return out


# -- outputs of a backbone ------------------------------------------------------------------------------------

Group = Callable[[str, Node, Tensor], bool]  # handles a nested group of outputs (True) or declines (False)


def check_model_outputs(model, x: Tensor, outputs: Node, recorded: dict, group: Group | None = None) -> None:
    for key, node in outputs.items():
        if key == "forward_features":
            node.close(model.forward_features(x))
        elif key == "forward":
            node.close(model(x))
        elif key.startswith("gil_") or key in recorded:
            node.close(run_intermediate(model, x, key, node.raw, recorded))
        elif group is None or not group(key, node, x):
            raise unknown(node, "output", "forward_features, forward, gil_*, any recorded get_intermediate_layers")


def load(model: torch.nn.Module, state: Node) -> torch.nn.Module:
    """Strict load; a state dict stored in another dtype (bfloat16) is copied into the float32 parameters."""
    model.load_state_dict(state.value, strict=True)
    return model


def check_inputs_outputs(fx: Node, model_for_input: Callable[[], torch.nn.Module], recorded, group=None) -> None:
    inputs = fx["inputs"]
    for name, expected in fx["outputs"].items():
        assert name in inputs, f"{expected.where}: no input {name!r} (inputs: {', '.join(inputs.raw)})"
        check_model_outputs(model_for_input(), inputs[name].value, expected, recorded, group)


# ------------------------------------------------------------------------------------------------------
# Checkers, one per kind


@torch.no_grad()
def check_vit(fx: Node) -> None:
    model = load(DinoVisionTransformer(**fx["model_kwargs"].value), fx["state_dict"]).eval()
    check_inputs_outputs(fx, lambda: model, recorded_intermediate_calls(fx.raw.get("calls", {})))
    for key, node in fx["rope_eval"].items() if "rope_eval" in fx else []:
        m = re.fullmatch(r"H(\d+)W(\d+)_(sin|cos)", key)
        if not m:
            raise unknown(node, "rope_eval key", "H<h>W<w>_<sin|cos>")
        sin, cos = model.rope_embed(int(m[1]), int(m[2]))
        node.close(sin if m[3] == "sin" else cos)


# Parts of a forward_features dict named by short keys (``g_cls`` = cls token of the group named g...)
_TOKEN_PARTS = {
    "cls": "x_norm_clstoken",
    "storage": "x_storage_tokens",
    "patch": "x_norm_patchtokens",
    "prenorm": "x_prenorm",
}


class RecordedForward:
    """A recorded ``model.forward_features(...)`` call, e.g. ``...([x_global, x_local], masks=[masks, None])
    -> [global, local]``: the named outputs are the keys ``<prefix>_<name>`` of a ``<prefix>_*`` entry."""

    def __init__(self, name: str, text: str, inputs: dict[str, Tensor]) -> None:
        call = parse_call(text, "forward_features")
        assert call is not None, f"calls.{name}: no forward_features(...) call in {text!r}"
        self.args, self.kwargs = call_arguments(call, inputs)
        m = re.search(r"->\s*\[([\w\s,]+)\]", text[text.index("forward_features(") :])
        self.names = [n.strip() for n in m[1].split(",")] if m else None
        self.prefix = name[:-1] if name.endswith("*") else None
        self.outputs = None

    def run(self, model: torch.nn.Module) -> Any:
        return model.forward_features(*self.args, **self.kwargs)

    def output(self, model: torch.nn.Module, key: str, node: Node) -> Any:
        """Our output for a key; the call runs once (with autograd, for a backward of these outputs)."""
        if self.outputs is None:
            self.outputs = self.run(model)
        if self.names is None:
            return self.outputs
        name = key.removeprefix(self.prefix or "")
        if name not in self.names:
            raise unknown(node, "output", f"{self.prefix}<{'|'.join(self.names)}>")
        return self.outputs[self.names.index(name)]


def check_vit_train(fx: Node) -> None:
    kwargs = fx["model_kwargs"].value
    model = load(DinoVisionTransformer(**kwargs), fx["state_dict"])
    settings = fx["settings"]
    mode = settings["mode"].value
    assert mode in ("model.train()", "model.eval()"), f"settings.mode {mode!r}"
    model.train(mode == "model.train()")
    assert settings["drop_path_rate"].value == 0 == model.drop_path_rate, "stochastic depth cannot be replayed"
    # The RoPE augmentation is on by default (model_kwargs) and switched off except for `*_rope_rescale_on`.
    for text in ("rope_train_aug_default", "rope_train_aug_used"):
        if text in settings:
            settings[text].doc()
    rescale = model.rope_embed.rescale_coords
    model.rope_embed.rescale_coords = None

    calls = fx["calls"].raw
    inputs = {name: node.value for name, node in fx["inputs"].items()}
    forwards: dict[str, RecordedForward] = {}

    def forward_of(key: str, node: Node) -> RecordedForward:
        entry = recorded_entry(calls, key)
        assert entry is not None, f"{node.where}: no recorded call in `calls` for {key!r}"
        if entry[0] not in forwards:
            forwards[entry[0]] = RecordedForward(*entry, inputs)
        return forwards[entry[0]]

    for key, node in fx.items():
        if key in ("model_kwargs", "state_dict", "settings", "inputs") or key in DOC_SECTIONS | DOC_TEXT:
            continue
        if key.endswith("_backward"):
            check_backward(model, node, forward_of(key.removesuffix("_backward") + "_*", node))
        elif key.endswith("_rope_rescale_on"):
            assert rescale is not None, f"{node.where}: the model has no RoPE rescale augmentation"
            model.rope_embed.rescale_coords = rescale
            check_rope_rescale_on(model, node, forward_of(key.removesuffix("_rope_rescale_on") + "_*", node))
            model.rope_embed.rescale_coords = None
        else:
            forward = forward_of(key, node)
            node.close(forward.output(model, key, node))


def check_backward(model: torch.nn.Module, node: Node, forward: RecordedForward) -> None:
    """``loss = sum_k (out_k * R_k).sum()``; ``R`` keys ``<initial of an output name>_<cls|storage|patch>``."""
    assert forward.names, f"{node.where}: the recorded call names no outputs"
    by_initial = {name[0]: name for name in forward.names}
    assert len(by_initial) == len(forward.names), f"{node.where}: output names {forward.names} share initials"
    loss = 0
    for key, r in node["R"].items():
        m = re.fullmatch(r"(\w)_(\w+)", key)
        if not m or m[1] not in by_initial or m[2] not in _TOKEN_PARTS:
            raise unknown(r, "R key", f"<{'|'.join(by_initial)}>_<{'|'.join(_TOKEN_PARTS)}>")
        out = forward.output(model, (forward.prefix or "") + by_initial[m[1]], r)
        loss = loss + (out[_TOKEN_PARTS[m[2]]] * r.value).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    # A sum of ~3k products: compared like gradients (relative when larger than 1).
    node["loss"].close(loss, grad=True)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected = node["grads"]
    assert set(grads) == set(expected.raw), f"{expected.where}: parameters {sorted(set(grads) ^ set(expected.raw))}"
    expected.close(grads, grad=True)


def check_rope_rescale_on(model: torch.nn.Module, node: Node, forward: RecordedForward) -> None:
    seed = node["seed"].value
    if "draws_in_call_order" in node:  # one draw per block per crop group, block-major
        draws = node["draws_in_call_order"]
        torch.manual_seed(seed)
        _, scale = model.rope_embed.draw_augmentations(len(draws))
        assert_close(scale[:, 0], torch.tensor(draws.value, dtype=scale.dtype), draws.where)
    torch.manual_seed(seed)
    with torch.no_grad():
        outputs = forward.run(model)
    for key, expected in node.items():
        if key in ("seed", "draws_in_call_order"):
            continue
        if not forward.names or key not in forward.names:
            raise unknown(expected, "output", f"seed, draws_in_call_order, {forward.names}")
        expected.close(outputs[forward.names.index(key)])


@torch.no_grad()
def check_convnext(fx: Node) -> None:
    kwargs = fx["model_kwargs"].value
    models: dict[int | None, ConvNeXt] = {}

    def model_with(patch_size: int | None) -> ConvNeXt:
        if patch_size not in models:
            models[patch_size] = load(ConvNeXt(**{**kwargs, "patch_size": patch_size}), fx["state_dict"]).eval()
        return models[patch_size]

    recorded = recorded_intermediate_calls(fx.raw.get("calls", {}))

    def patch_size_group(key: str, node: Node, x: Tensor) -> bool:
        """``patch_size_<p>``: the outputs of ``ConvNeXt(**model_kwargs, patch_size=p)``, same weights."""
        m = re.fullmatch(r"patch_size_(None|\d+)", key)
        if m:
            check_model_outputs(model_with(None if m[1] == "None" else int(m[1])), x, node, recorded)
        return bool(m)

    check_inputs_outputs(fx, lambda: model_with(kwargs.get("patch_size")), recorded, patch_size_group)
    if "patch_size_variant" in fx:  # the file says it has outputs of this patch size: they must be there
        variant = fx["patch_size_variant"].value
        for _, outputs in fx["outputs"].items():
            assert f"patch_size_{variant}" in outputs, f"{outputs.where}: no patch_size_{variant} outputs"


# DINOHead outputs: the recorded calls of the fixture README.
HEAD_OUTPUTS: dict[str, Callable[[DINOHead, dict[str, Tensor]], Tensor]] = {
    "forward": lambda head, inp: head(inp["x"]),
    "no_last_layer": lambda head, inp: head(inp["x"], no_last_layer=True),
    "mlp_prenorm": lambda head, inp: head.mlp(inp["x"]),
    "only_last_layer_on_no_last_layer": lambda head, inp: head(
        head(inp["x"], no_last_layer=True), only_last_layer=True
    ),
    "only_last_layer_on_z": lambda head, inp: head(inp["z"], only_last_layer=True),
}


def check_head(head_kwargs: Node, state: Node, inputs: Node, outputs: Node, skip: tuple[str, ...] = ()) -> None:
    head = load(DINOHead(**head_kwargs.value), state)
    inp = {name: node.value for name, node in inputs.items()}
    for key, node in outputs.items():
        if key in skip:
            continue
        if key in HEAD_OUTPUTS:
            with torch.no_grad():
                node.close(HEAD_OUTPUTS[key](head, inp))
        elif key == "backward":  # loss = (head(x) * R).sum(), x requires grad
            x = inp["x"].clone().requires_grad_(True)
            loss = (head(x) * inp["R"]).sum()
            loss.backward()
            node["loss"].close(loss, grad=True)
            node["grad_x"].close(x.grad, grad=True)
            node["grads"].close({name: p.grad for name, p in head.named_parameters()}, grad=True)
        else:
            raise unknown(node, "output", ", ".join([*HEAD_OUTPUTS, "backward"]))


def check_dino_head(fx: Node) -> None:
    check_head(fx["model_kwargs"], fx["state_dict"], fx["inputs"], fx["outputs"])
    for _, variant in fx["variants"].items() if "variants" in fx else []:
        inputs = variant["inputs"] if "inputs" in variant else fx["inputs"]
        skip = ("head_kwargs", "state_dict", "inputs", *DOC_ANY)
        check_head(variant["head_kwargs"], variant["state_dict"], inputs, variant, skip)


def check_masking(fx: Node) -> None:
    # Our generator owns its random streams; seeded like the official global ones, the masks are identical
    # (positions included, which is stricter than the counts and structure the fixture asks for).
    ctor = ("input_size", "max_num_patches", "min_num_patches", "min_aspect", "max_aspect", "seed")
    for _, case in fx["cases"].items():
        kwargs = {name: case[name].value for name in ctor if name in case}
        kwargs["input_size"] = tuple(kwargs["input_size"])
        gen = BlockMaskGenerator(**kwargs)
        counts = case["counts_in_call_order"]
        masks = torch.stack([torch.from_numpy(gen(n)) for n in counts.value])
        counts.equal(masks.flatten(1).sum(1).tolist())
        case["masks"].equal(masks)
    for _, case in fx["collate_cases"].items() if "collate_cases" in fx else []:
        n_tokens = case["n_tokens"].value
        side = math.isqrt(n_tokens)
        assert side * side == n_tokens, f"{case.where}: {n_tokens} tokens is not a square grid"
        gen = BlockMaskGenerator((side, side), max_num_patches=0.5 * n_tokens, seed=case["seed"].value)
        out = collate_masks(case["B"].value * case["n_global_crops"].value, n_tokens, gen)
        for key, node in case.items():
            if key in out:
                node.equal(out[key])
            elif key not in ("seed", "B", "n_global_crops", "n_tokens"):
                raise unknown(node, "collate output", ", ".join(out))


def check_loss_collate(collate: Node, c: dict) -> None:
    """The official collate that made the iBOT masks of the loss inputs, re-run with ours: seeded like the
    official global RNGs (``collate.seeds``), a generator on the token grid with train.py's
    ``max_num_patches = 0.5 * n_tokens``, the constants' mask ratios and probability."""
    seeds = collate["seeds"].value
    py, np_ = (re.search(rf"(?<![\w.]){name}\.seed\((\d+)\)", seeds) for name in ("random", r"np\.random"))
    assert py and np_ and py[1] == np_[1], f"{collate.where}.seeds: expected random.seed(s); np.random.seed(s)"
    gen = BlockMaskGenerator((c["grid"], c["grid"]), max_num_patches=0.5 * c["n_tokens"], seed=int(py[1]))
    ratio, probability = tuple(c["mask_ratio_min_max"]), c["mask_sample_probability"]
    out = collate_masks(c["n_global_crops"] * c["B"], c["n_tokens"], gen, ratio, probability)
    for key, node in collate.items():
        if key in out:
            node.equal(out[key])
        elif key not in ("seeds", "call"):
            raise unknown(node, "collate output", ", ".join(out))


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def check_losses(fx: Node) -> None:
    c = {name: node.value for name, node in fx["constants"].items()}
    inp = {name: node.value for name, node in fx["inputs"].items()}
    collate = fx["collate"]
    check_loss_collate(collate, c)
    masks, weights, n_masked = (collate[k].raw for k in ("collated_masks", "masks_weight", "n_masked_patches"))
    n_global, B = c["n_global_crops"], c["B"]
    # The sizes the constants state are those of the inputs.
    stated = {"K_dino": "teacher_cls_logits", "K_ibot": "teacher_patch_logits", "D": "koleo_x"}
    for constant, name in stated.items():
        assert name not in inp or inp[name].shape[-1] == c[constant], f"constants.{constant} != inputs.{name} size"
    assert c["grid"] ** 2 == c["n_tokens"] == masks.shape[1], "constants: grid, n_tokens"
    n_iter, student_temp = c["sinkhorn_knopp_n_iterations"], c["student_temp"]

    def dino_centred(T: float) -> Tensor:
        return sinkhorn_knopp(inp["teacher_cls_logits"], T, n_iter).unflatten(0, (n_global, B))

    def ibot_centred(T: float) -> Tensor:
        return sinkhorn_knopp(inp["teacher_patch_logits"], T, n_iter, n_samples=n_masked)

    sections = {"constants", "inputs", "collate", "dino", "ibot", "koleo", "gram"}
    for key, node in fx.items():
        if key.startswith("compute_losses_"):
            check_compute_losses(node, temperature(key, "compute_losses_", node), c, inp, collate, dino_centred)
        elif key not in sections and key not in DOC_SECTIONS:
            raise unknown(node, "section", f"{', '.join(sorted(sections))}, compute_losses_T<temperature>")

    for key, ref in fx["dino"].items() if "dino" in fx else []:
        if key == "softmax_center":
            check_softmax_center(ref, c, inp)
            continue
        centred = dino_centred(temperature(key, "", ref))
        run = functools.cache(
            lambda c=centred: dino_losses(c, inp["student_global_logits"], inp["student_local_logits"], student_temp)
        )
        ours = {
            "sk_centered": (lambda c=centred: c, False),
            "local_loss": (lambda r=run: r()["local"], False),
            "global_loss_ignore_diagonal": (lambda r=run: r()["global"], False),
            "global_loss_no_ignore": (lambda r=run: r()["global_no_ignore"], False),
            "grad_student_global_of_local_plus_global": (lambda r=run: r()["grad_global"], True),
            "grad_student_local_of_local_plus_global": (lambda r=run: r()["grad_local"], True),
        }
        compare_named(ref, ours)

    for key, ref in fx["ibot"].items() if "ibot" in fx else []:
        if key == "dense_forward":
            loss = ibot_loss_dense(inp["student_patch_dense"], inp["teacher_patch_dense"], masks, student_temp)
            compare_named(ref, {"loss": (loss, False)})
        elif key.startswith("compiled_vs_eager_sk_max_abs_diff_"):
            # The official module is compiled, the golden values come from its eager code: within tolerance.
            temperature(key, "compiled_vs_eager_sk_max_abs_diff_", ref)
            assert ref.value <= OUTPUT_ATOL, f"{ref.where}: official compiled and eager SK differ by {ref.raw}"
        else:
            centred = ibot_centred(temperature(key, "", ref))
            student = _leaf(inp["student_patch_logits"])
            loss = ibot_loss_masked(student, centred, masks, weights, student_temp)
            default = ibot_loss_masked(student, centred, masks, None, student_temp)
            loss.backward()
            ours = {
                "sk_centered": (centred, False),
                "loss_forward_masked": (loss, False),
                "loss_forward_masked_default_weights": (default, False),
                "grad_student_patch_logits": (student.grad, True),
            }
            compare_named(ref, ours)

    if "koleo" in fx:
        ref = fx["koleo"]
        x = _leaf(inp["koleo_x"])
        per_crop = [koleo_loss(x[i]) for i in range(x.shape[0])]
        mean = sum(per_crop) / len(per_crop)
        mean.backward()
        ours = {
            "per_crop": (per_crop, False),
            "ssl_mean_over_global_crops": (mean, False),
            "grad_koleo_x": (x.grad, True),
        }
        for key, node in ref.items():
            m = re.fullmatch(r"distributed_topk(\d+)_world(\d+)", key)
            if m:
                assert m[2] == "1", f"{node.where}: only world size 1 can be checked in one process"
                node.close(koleo_loss_distributed(inp["koleo_x"][0], topk=int(m[1])))
        compare_named(ref, ours, skip=lambda key: key.startswith("distributed_topk"))

    gram_args = {
        "apply_norm": "normalize",
        "remove_neg": "remove_neg",
        "remove_only_teacher_neg": "remove_only_teacher_neg",
    }
    for _, ref in fx["gram"].items() if "gram" in fx else []:
        ctor = ref["ctor"].value
        assert set(ctor) <= set(gram_args), f"{ref.where}.ctor: unknown GramLoss arguments {set(ctor) - set(gram_args)}"
        student = _leaf(inp["gram_student"])
        kwargs = {gram_args[k]: v for k, v in ctor.items()}
        loss = gram_loss(student, inp["gram_teacher"], img_level=ref["img_level"].value, **kwargs)
        loss.backward()
        compare_named(ref, {"loss": (loss, True), "grad_student": (student.grad, True)}, skip=("ctor", "img_level"))


def dino_losses(centred: Tensor, student_global: Tensor, student_local: Tensor, student_temp: float) -> dict:
    """The DINO terms of SSLMetaArch, and the gradients of local + global (ignore_diagonal) loss."""
    sg, sl = _leaf(student_global), _leaf(student_local)
    local = dino_loss(sl, centred, student_temp)
    glob = dino_loss(sg, centred, student_temp, ignore_diagonal=True)
    (local + glob).backward()
    no_ignore = dino_loss(sg, centred, student_temp)
    return {
        "local": local,
        "global": glob,
        "global_no_ignore": no_ignore,
        "grad_global": sg.grad,
        "grad_local": sl.grad,
    }


def compare_named(ref: Node, ours: dict[str, tuple[Any, bool]], skip=()) -> None:
    """Compares every entry of ``ref`` with ``ours[name] = (value or a function computing it, compared like a
    gradient)``; only the entries a file has are computed."""
    for key, node in ref.items():
        if (callable(skip) and skip(key)) or (not callable(skip) and key in skip):
            continue
        if key in DOC_TEXT and isinstance(node.raw, str):
            continue  # documentation
        if key not in ours:
            raise unknown(node, "output", ", ".join(ours))
        value, grad = ours[key]
        node.close(value() if callable(value) else value, grad=grad)


def check_softmax_center(ref: Node, c: dict, inp: dict) -> None:
    """DINOv2-style centring: ``center`` (the centre used), ``probs_T<T>`` at any temperature with it, then
    ``center_after_update`` after one update with the teacher logits."""
    center = SoftmaxCenter(c["K_dino"], momentum=c["center_momentum"])
    start = ref["center"].value if "center" in ref else inp["center_dino"]
    assert torch.equal(start, inp["center_dino"]), f"{ref.where}.center differs from inputs.center_dino"
    center.center.copy_(start)
    updated = None
    for key, node in ref.items():
        if key == "center":
            continue
        if key == "center_after_update":
            updated = node
        else:
            node.close(center.probs(inp["teacher_cls_logits"], temperature(key, "probs_", node)))
    if updated is not None:
        center.update(inp["teacher_cls_logits"])
        updated.close(center.center)


def check_compute_losses(ref: Node, T: float, c: dict, inp: dict, collate: Node, dino_centred) -> None:
    """The official ``SSLMetaArch.compute_losses`` on the fixture's inputs: the total and every term."""
    masks, weights = collate["collated_masks"].raw, collate["masks_weight"].raw
    n_masked = collate["n_masked_patches"].raw
    terms, w = ref["terms"], c["loss_weights"]
    centred = dino_centred(T)
    ibot_t = sinkhorn_knopp(inp["teacher_patch_logits"], T, c["sinkhorn_knopp_n_iterations"], n_samples=n_masked)
    ours = dict(
        dino_local=dino_loss(inp["student_local_logits"], centred, c["student_temp"]),
        dino_global=dino_loss(inp["student_global_logits"], centred, c["student_temp"], ignore_diagonal=True),
        koleo=sum(koleo_loss(x) for x in inp["koleo_x"]) / c["n_global_crops"],
        ibot=ibot_loss_masked(inp["student_patch_logits"], ibot_t, masks, weights, c["student_temp"]),
        gram=gram_loss(inp["gram_student"], inp["gram_teacher"], img_level=False),
    )
    total = total_loss(
        LossWeights(w["dino"], w["koleo"], w["ibot"], w["dino_global_ignore_diagonal"]),
        c["n_global_crops"],
        c["n_local_crops"],
        dino_local_weight=terms["dino_local_loss_weight"].value,
        gram_weight=terms["gram_loss_weight"].value,
        **ours,
    )
    ref["total"].close(total, grad=True)
    names = {"dino_local_crops_loss": "dino_local", "dino_global_crops_loss": "dino_global"}
    for key, node in terms.items():
        if key in ("dino_local_loss_weight", "gram_loss_weight"):
            continue
        name = names.get(key, key.removesuffix("_loss"))
        if name not in ours or not key.endswith("_loss"):
            raise unknown(node, "term", ", ".join(sorted(names) + [f"{n}_loss" for n in ("koleo", "ibot", "gram")]))
        node.close(ours[name])
    if "inputs" in ref:
        ref["inputs"].doc()  # text: which fixture inputs fed which argument


# -- schedules ------------------------------------------------------------------------------------------------

# The official DINOv3 stage configs and our presets of them (configs/stages).
STAGE_PRESETS = {
    "dinov3_vit7b16_pretrain.yaml": "pretrain",
    "dinov3_vit7b16_gram_anchor.yaml": "gram",
    "dinov3_vit7b16_high_res_adapt.yaml": "hires",
}
# Official config keys -> ours (prefixes); other keys have the same names.
OFFICIAL_KEYS = {
    "train.OFFICIAL_EPOCH_LENGTH": "train.epoch_length",
    "train.batch_size_per_gpu": "train.batch_size",
    "dino.local_loss_weight_schedule.": "schedules.dino_local_loss_weight.",
    "gram.loss_weight_schedule.": "schedules.gram_loss_weight.",
}


def our_key(official: str) -> str:
    for prefix, ours in OFFICIAL_KEYS.items():
        if official.startswith(prefix):
            return ours + official.removeprefix(prefix)
    return official


def stage_config(config_file: Node, opts: Node) -> dict:
    """Our preset of an official stage config, with the official command-line ``opts`` applied."""
    name = config_file.value.rsplit("/", 1)[-1]
    assert name in STAGE_PRESETS, f"{config_file.where}: no preset for {name!r}; known: {', '.join(STAGE_PRESETS)}"
    cfg = load_yaml(REPO / "configs" / "stages" / f"{STAGE_PRESETS[name]}.yaml")
    overrides = []
    for item in opts.value:
        key, _, value = item.partition("=")
        overrides.append(f"{our_key(key)}={value}")
    free = frozenset(f"schedules.{name}" for name in cfg["schedules"])  # unset fields take their defaults
    return apply_overrides(cfg, overrides, values=free)


def config_value(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def our_schedule(ours: dict[str, Schedule], name: str, expected: Node) -> Schedule:
    assert name in ours, f"{expected.where}: we build no {name!r} schedule (ours: {', '.join(ours)})"
    return ours[name]


def compare_schedules(ours: dict[str, Schedule], arrays: Node) -> None:
    for name, expected in arrays.items():
        expected.close(torch.from_numpy(our_schedule(ours, name, expected).values))


def official_specs(case: Node) -> dict[str, ScheduleSpec]:
    """ScheduleSpecs from the official schedule sections stored with a v2 case."""
    specs = schedule_specs(case["cfg_schedules"].value)
    for name in ("dino_local_loss_weight", "gram_loss_weight"):
        if f"cfg_{name}_schedule" in case:
            specs[name] = ScheduleSpec(**case[f"cfg_{name}_schedule"].value)
    return specs


def check_schedules(fx: Node) -> None:
    for _, case in fx["cosine_scheduler_direct"].items() if "cosine_scheduler_direct" in fx else []:
        sched = cosine_schedule(**case["kwargs"].value)
        case["schedule"].close(torch.from_numpy(sched.values))
        indexed = case["indexed"]
        indexed.close(torch.tensor([sched[i] for i in range(len(indexed))], dtype=torch.float64))
    for _, case in fx["linear_warmup_cosine_decay_direct"].items() if "linear_warmup_cosine_decay_direct" in fx else []:
        case["array"].close(torch.from_numpy(linear_warmup_cosine_decay(**case["kwargs"].value)))
    for _, case in fx["v1"].items() if "v1" in fx else []:
        check_schedules_v1(case)
    for _, case in fx["v2"].items() if "v2" in fx else []:
        check_schedules_v2(case)
    scaling = fx["scaling"] if "scaling" in fx else None
    for _, case in scaling["v1"].items() if scaling and "v1" in scaling else []:
        lr = scale_lr(
            case["lr_before"].value, case["rule"].value, case["batch_size_per_gpu"].value, case["world_size"].value
        )
        case["lr_after"].float(lr)
    for _, case in scaling["v2"].items() if scaling and "v2" in scaling else []:
        cfg = stage_config(case["config_file"], case["opts"])
        case["rule"].equal(cfg["optim"]["scaling_rule"])
        case["batch_size_per_gpu"].equal(cfg["train"]["batch_size"])
        lr_spec = cfg["schedules"]["lr"]
        case["peak_before"].float(lr_spec["peak"])
        case["end_before"].float(lr_spec["end"])
        scale = scale_lr(1.0, cfg["optim"]["scaling_rule"], cfg["train"]["batch_size"], case["world_size"].value)
        specs = schedule_specs(cfg["schedules"])
        ours = build_schedules(specs, cfg["optim"]["epochs"], cfg["train"]["epoch_length"], scale)
        case["lr"].close(torch.from_numpy(ours["lr"].values))
        case["last_layer_lr"].close(torch.from_numpy(ours["last_layer_lr"].values))
        warmup = int(specs["lr"].warmup_epochs * cfg["train"]["epoch_length"])
        case["lr_at_end_of_warmup"].float(ours["lr"][warmup])
        case["lr_last"].float(ours["lr"].values[-1])


def check_schedules_v1(case: Node) -> None:
    optim, teacher = case["cfg_optim"].value, case["cfg_teacher"].value  # the official config after scaling
    case["config_file"].doc()
    case["opts"].doc()  # their effect is cfg_optim / cfg_teacher
    scaled = scale_lr(
        case["lr_before_scaling"].value,
        optim["scaling_rule"],
        case["batch_size_per_gpu"].value,
        case["world_size"].value,
    )
    case["lr_after_scaling"].float(scaled, rel=1e-15)
    assert_float(optim["lr"], scaled, f"{case.where}.cfg_optim.lr", rel=1e-15)
    epoch_length = case["OFFICIAL_EPOCH_LENGTH"].value
    schedules = build_schedules_v1(V1Settings.from_official(optim, teacher), epoch_length)
    for key in ("schedule", "indexed", "total_iters", "final_value"):
        for name, expected in case[key].items():
            ours = our_schedule(schedules, name, expected)
            if key == "schedule":
                expected.close(torch.from_numpy(ours.values))
            elif key == "indexed":
                expected.close(torch.tensor([ours[i] for i in range(len(expected))], dtype=torch.float64))
            elif key == "total_iters":
                expected.equal(len(ours))
            else:
                expected.float(ours.final_value, rel=1e-15)
    if optim["schedule_trunc_extra"] == 0:  # the `shape: v1` specs of the presets give the same values
        v1 = {"shape": "v1"}
        o, t = optim, teacher
        specs = {
            "lr": ScheduleSpec(0.0, o["lr"], o["min_lr"], o["warmup_epochs"], **v1),
            "weight_decay": ScheduleSpec(o["weight_decay"], o["weight_decay"], o["weight_decay_end"], **v1),
            "momentum": ScheduleSpec(t["momentum_teacher"], t["momentum_teacher"], t["final_momentum_teacher"], **v1),
            "teacher_temp": ScheduleSpec(
                t["warmup_teacher_temp"], t["teacher_temp"], t["teacher_temp"], t["warmup_teacher_temp_epochs"], **v1
            ),
        }
        specs["lr"].freeze_last_layer_epochs = o["freeze_last_layer_epochs"]
        from_specs = build_schedules(specs, o["epochs"], epoch_length, 1.0)
        for name, expected in case["indexed"].items():
            ours = our_schedule(from_specs, name, expected)
            indexed = torch.tensor([ours[i] for i in range(len(expected))], dtype=torch.float64)
            assert_close(indexed, expected.raw, f"{expected.where} (from shape: v1 specs)")


def check_schedules_v2(case: Node) -> None:
    """Our stage preset with the official opts, and our schedules of the official schedule sections, both
    give the official arrays."""
    cfg = stage_config(case["config_file"], case["opts"])
    for item in case["kept_unshrunk"].value:  # opts of the official run left out: our preset has these values
        key, _, value = item.partition("=")
        assert config_value(cfg, our_key(key)) == ast.literal_eval(value), f"{case.where}.kept_unshrunk: {item}"
    epochs, epoch_length = cfg["optim"]["epochs"], cfg["train"]["epoch_length"]
    case["epochs"].equal(epochs)
    case["OFFICIAL_EPOCH_LENGTH"].equal(epoch_length)
    case["total_iterations"].equal(int(epochs * epoch_length))
    case["batch_size_per_gpu"].equal(cfg["train"]["batch_size"])
    case["scaling_rule"].equal(cfg["optim"]["scaling_rule"])
    scale = scale_lr(1.0, cfg["optim"]["scaling_rule"], cfg["train"]["batch_size"], case["world_size"].value)
    compare_schedules(build_schedules(schedule_specs(cfg["schedules"]), epochs, epoch_length, scale), case["arrays"])
    from_official = build_schedules(official_specs(case), epochs, epoch_length, scale)
    for name, expected in case["arrays"].items():
        assert_close(
            torch.from_numpy(our_schedule(from_official, name, expected).values),
            expected.raw,
            f"{expected.where} (official cfg)",
        )


def check_param_groups(fx: Node) -> None:
    backbone = DinoVisionTransformer(**fx["model_kwargs"].value)
    heads = {name: DINOHead(**kw) for name, kw in fx["head_kwargs"].value.items()}
    student = {"backbone": backbone, **heads}
    order = fx["student_order"].value if "student_order" in fx else list(student)
    student = {name: student[name] for name in order}
    for _, case in fx["cases"].items():
        optim = case["optim"].value
        # dino_head_wd_multiplier has no effect officially (relative names never contain "dino_head").
        settings = param_settings(student, optim["layerwise_decay"], optim["patch_embed_lr_mult"])
        by_name = {s.name: s for s in settings}
        groups = case["groups"]
        if not optim["multi_tensor_optim"]:
            assert [s.name for s in settings] == [g["param"] for g in groups.raw], f"{groups.where}: order differs"
            for (_, ref), s in zip(groups.items(), settings, strict=True):
                ref["param"].equal(s.name)
                check_setting(ref, s, skip=("param",))
                ref["name"].equal(s.name.split(".", 1)[1])  # relative to its submodule
        else:
            # The official grouping (per submodule) exactly; the optimizer's own groups merge equal settings
            # across submodules (the same update, tests/test_static_step.py): each official group lies whole
            # in one of them.
            ours = param_groups(settings, fuse=True, merge_submodules=False)
            fused = build_optimizer(ours).defaults["fused"]
            assert len(ours) == len(groups), f"{groups.where}: {len(ours)} groups != {len(groups)}"
            merged = [set(g["names"]) for g in param_groups(settings, fuse=True)]
            for (_, ref), g in zip(groups.items(), ours, strict=True):
                ref["params"].equal(g["names"])
                ref["fused"].equal(fused)
                ref["foreach"].doc()  # the multi-tensor path; torch takes fused=True over it
                check_setting(ref, by_name[g["names"][0]], skip=("params", "fused", "foreach"))
                assert sum(set(g["names"]) <= m for m in merged) == 1, f"{groups.where}: split by the merge"
        for name, ref in case["by_param"].items() if "by_param" in case else []:
            assert name in by_name, f"{ref.where}: we have no parameter {name!r}"
            check_setting(ref, by_name[name])
        if "apply_optim_scheduler" in case:
            check_apply_schedules(case["apply_optim_scheduler"], settings)


def check_setting(ref: Node, s, skip=()) -> None:
    for key, node in ref.items():
        if key in skip:
            continue
        if key == "lr_multiplier":
            node.float(s.lr_multiplier)
        elif key in ("wd_multiplier", "is_last_layer"):
            node.equal(getattr(s, key))
        elif key != "name":
            raise unknown(node, "parameter setting", "param, name, lr_multiplier, wd_multiplier, is_last_layer")


def check_apply_schedules(applied: Node, settings) -> None:
    call = parse_call(applied["call"].value, "apply_optim_scheduler")
    assert call is not None, f"{applied.where}.call: no apply_optim_scheduler(...) call"
    args, kwargs = call_arguments(call, {"opt": INPUT})
    assert args == [INPUT] and set(kwargs) == {"lr", "wd", "last_layer_lr"}, f"{applied.where}.call: {kwargs}"
    optimizer = build_optimizer(param_groups(settings, fuse=False), tuple(applied["betas"].value))
    apply_schedules(optimizer, kwargs["lr"], kwargs["wd"], kwargs["last_layer_lr"])
    per_param = applied["per_param"]
    ours = {name: group for group in optimizer.param_groups for name in group["names"]}
    assert set(ours) == set(per_param.raw), f"{per_param.where}: parameters differ"
    for name, ref in per_param.items():
        ref["lr"].float(ours[name]["lr"], rel=1e-15)
        ref["weight_decay"].float(ours[name]["weight_decay"], rel=1e-15)


CHECKERS: dict[str, Callable[[Node], None]] = {
    "vit": check_vit,
    "vit_train": check_vit_train,
    "convnext": check_convnext,
    "dino_head": check_dino_head,
    "masking": check_masking,
    "losses": check_losses,
    "schedules": check_schedules,
    "param_groups": check_param_groups,
}


def check_data(data: dict, where: str = "fixture") -> None:
    """Runs the checker of a fixture's kind, then fails on any value of it that nothing interpreted."""
    kind = data.get("kind")
    assert kind in CHECKERS, f"{where}: no checker for kind {kind!r}; known: {sorted(CHECKERS)}"
    root = Node(data)
    CHECKERS[kind](root)
    missed = root.uninterpreted()
    assert not missed, (
        f"{where} (kind {kind!r}): {len(missed)} values no check interpreted (teach tests/official_harness.py "
        f"what they mean): {', '.join(missed[:20])}{' ...' if len(missed) > 20 else ''}"
    )


def check_file(path) -> None:
    """Loads a fixture file (plain containers and tensors only) and checks it; an unknown kind is a failure."""
    check_data(torch.load(path, weights_only=True, map_location="cpu"), str(path))
