"""ONNX export of backbones (ViT with RoPE, ConvNeXt) and of a text-aligned model's towers, checked in onnxruntime.

The export goes through ``torch.onnx.export(dynamo=True)``: the model is captured by ``torch.export`` with
symbolic batch and grid sizes, so RoPE's sine / cosine tables, which depend on the patch grid, are computed in
the graph for whatever size comes in rather than frozen at the example's size. What stays static: the number
of input channels, the token width, and (text tower) nothing but the batch — the context length is free up to
the tower's own.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # largest |onnxruntime - PyTorch| a --check accepts
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (protobuf caps a file at 2 GiB)
MAX_SIDE = 4096  # the largest image side a dynamic export admits (pixels)


class ExportError(ValueError):
    """A model or setting the export cannot take (named in the message)."""


class BackboneTokens(nn.Module):
    """``images [B, C, H, W]`` -> ``cls [B, D]``, ``storage [B, R, D]``, ``patch [B, h*w, D]`` (normalised)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.with_storage = getattr(backbone, "n_storage_tokens", 0) > 0

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone.forward_features(images)
        if self.with_storage:
            return out["x_norm_clstoken"], out["x_storage_tokens"], out["x_norm_patchtokens"]
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]  # an empty output is not valid ONNX

    @property
    def output_names(self) -> list[str]:
        return ["cls", "storage", "patch"] if self.with_storage else ["cls", "patch"]


class ImageEmbedding(nn.Module):
    """A text-aligned model's image side: ``images`` -> the normalised image embedding ``[B, E]`` and patch
    embeddings ``[B, h*w, E/2]`` (what zero-shot classification and open-vocabulary segmentation compare)."""

    output_names = ["image_embedding", "patch_embeddings"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        from opendino.models.text import backbone_tokens

        image, patches = self.model.head(backbone_tokens(self.model.backbone, images), self.model.n_prefix)
        return F.normalize(image, dim=-1), F.normalize(patches, dim=-1)


class TextEmbedding(nn.Module):
    """A text-aligned model's text side: token ids ``[B, T]`` -> the normalised text embedding ``[B, E]``."""

    output_names = ["text_embedding"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens), dim=-1)


@dataclass
class Exported:
    """One written file: its path, the module it came from and the inputs to check it with."""

    path: Path
    module: nn.Module
    check_inputs: list[Tensor]
    max_diff: float | None = None

    def describe(self) -> str:
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph

        def shape(value) -> str:
            dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
            return f"{value.name} [{', '.join(dims)}]"

        inputs = ", ".join(shape(v) for v in graph.input)
        outputs = ", ".join(shape(v) for v in graph.output)
        checked = "" if self.max_diff is None else f"; onnxruntime vs PyTorch max |diff| {self.max_diff:.2e}"
        return f"{self.path}: {inputs} -> {outputs}{checked}"


def _name_axes(path: Path, names: dict[str, Sequence[str | None]]) -> None:
    """Writes the named axes onto the graph's inputs and outputs (``None`` keeps a dimension as it is)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the weights stay where the exporter put them
    for value in [*model.graph.input, *model.graph.output]:
        for dim, name in zip(value.type.tensor_type.shape.dim, names.get(value.name, ()), strict=False):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
    onnx.save(model, str(path))


def export_module(
    module: nn.Module,
    example: Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
    dynamic: dict[int, tuple[str, int, int]] | None = None,
    axis_names: dict[str, Sequence[str | None]] | None = None,
) -> None:
    """Exports ``module(example)`` to ``path``. ``dynamic``: ``{axis: (name, multiple, max)}`` of the input, each
    free in multiples of ``multiple`` up to ``max``; ``axis_names`` names the axes of the inputs and outputs."""
    shapes = None
    if dynamic:
        axes = {}
        for axis, (name, multiple, largest) in dynamic.items():
            if multiple == 1:
                axes[axis] = torch.export.Dim(name, min=1, max=largest)
            else:
                axes[axis] = multiple * torch.export.Dim(f"{name}_{multiple}", min=1, max=largest // multiple)
        shapes = {next(iter(_forward_arguments(module))): axes}
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter reports its progress on stdout and warns about its own internals: the caller says what
    # was written, and a failure still raises.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes=shapes,
            # one file where protobuf allows it (2 GiB); larger models keep their weights in OUT.onnx.data
            external_data=sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    if axis_names:
        _name_axes(path, axis_names)


def _forward_arguments(module: nn.Module) -> list[str]:
    import inspect

    return [n for n in inspect.signature(module.forward).parameters if n != "self"]


def run_onnx(path: Path, inputs: Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})


@torch.inference_mode()
def check_onnx(path: Path, module: nn.Module, inputs: Sequence[Tensor]) -> float:
    """The largest ``|onnxruntime - PyTorch|`` over every output, for each input in ``inputs``."""
    worst = 0.0
    for x in inputs:
        expected = module(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = run_onnx(path, x)
        if len(got) != len(expected):
            raise ExportError(f"{path}: {len(got)} outputs, PyTorch gives {len(expected)}")
        for g, e in zip(got, expected, strict=True):
            if g.shape != tuple(e.shape):
                raise ExportError(f"{path}: output of shape {g.shape}, PyTorch gives {tuple(e.shape)}")
            diff = np.abs(g.astype(np.float64) - e.double().numpy())
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def _images(batch: int, channels: int, side: int, dtype: torch.dtype, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, side, side, generator=generator).to(dtype)


def export_backbone(backbone: nn.Module, out: Path, resolution: int, dynamic: bool, dtype: str = "fp32") -> Exported:
    """``out``: the backbone's tokens; with ``dynamic`` batch and image size free, else batch 1 at ``resolution``."""
    from opendino.models.registry import input_channels

    stride = backbone.feature_stride
    if resolution % stride:
        raise ExportError(f"--resolution {resolution} is not a multiple of the model's stride {stride}")
    module = BackboneTokens(backbone.to(DTYPES[dtype]).eval())
    channels = input_channels(backbone)
    example = _images(2 if dynamic else 1, channels, resolution, DTYPES[dtype], 0)
    token_axes = ["batch", None, None]
    names = {
        "images": ["batch", None, "height", "width"],
        "cls": ["batch", None],
        "storage": token_axes,
        "patch": ["batch", "patches", None],
    }
    axes = {0: ("batch", 1, 1 << 16), 2: ("height", stride, MAX_SIDE), 3: ("width", stride, MAX_SIDE)}
    export_module(module, example, out, "images", module.output_names, axes if dynamic else None, names)
    checks = [_images(1 if not dynamic else 2, channels, resolution, DTYPES[dtype], 1)]
    if dynamic:  # another batch and a non-square size of another grid
        checks.append(_images(3, channels, resolution + 2 * stride, DTYPES[dtype], 2)[..., : resolution + stride])
    return Exported(out, module, checks)


def export_text_aligned(model: nn.Module, out: Path, resolution: int, dynamic: bool, dtype: str) -> list[Exported]:
    """``OUT.image.onnx`` (images -> embeddings) and ``OUT.text.onnx`` (token ids -> embedding)."""
    from opendino.models.registry import input_channels

    model = model.to(DTYPES[dtype]).eval()
    stride = model.backbone.feature_stride
    channels = input_channels(model.backbone)
    image = ImageEmbedding(model)
    image_path = out.with_suffix(".image.onnx")
    axes = {0: ("batch", 1, 1 << 16), 2: ("height", stride, MAX_SIDE), 3: ("width", stride, MAX_SIDE)}
    names = {
        "images": ["batch", None, "height", "width"],
        "image_embedding": ["batch", None],
        "patch_embeddings": ["batch", "patches", None],
    }
    example = _images(2 if dynamic else 1, channels, resolution, DTYPES[dtype], 0)
    export_module(image, example, image_path, "images", image.output_names, axes if dynamic else None, names)
    image_checks = [_images(1 if not dynamic else 2, channels, resolution, DTYPES[dtype], 1)]
    if dynamic:
        image_checks.append(_images(3, channels, resolution + stride, DTYPES[dtype], 2))

    text = TextEmbedding(model)
    text_path = out.with_suffix(".text.onnx")
    context = model.text.context_length
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, model.text.token_embedding.num_embeddings, (2, context), generator=generator)
    if not dynamic:
        tokens = tokens[:1]
    text_axes = {0: ("batch", 1, 1 << 16)} if dynamic else None
    text_names = {"tokens": ["batch", None], "text_embedding": ["batch", None]}
    export_module(text, tokens, text_path, "tokens", text.output_names, text_axes, text_names)
    text_checks = [tokens.flip(0)]
    return [Exported(image_path, image, image_checks), Exported(text_path, text, text_checks)]


def export_source(
    source: str,
    out: Path,
    *,
    weights: str | None = None,
    resolution: int = 224,
    dynamic: bool = False,
    dtype: str = "fp32",
    check: bool = False,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Exports a run folder, a checkpoint file or a registered name (random weights, said through ``say``) and
    returns a line per written file; with ``check`` each file is run in onnxruntime against PyTorch."""
    from opendino.eval.suite import resolve_model
    from opendino.models.checkpoint import CheckpointError
    from opendino.models.registry import UnknownModelError
    from opendino.models.text import load_text_model

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    path = Path(source)
    try:
        backbone, _ = resolve_model(source, weights, say)
    except UnknownModelError as e:
        raise ExportError(str(e)) from None
    started = time.perf_counter()
    exported = [export_backbone(backbone, out, resolution, dynamic, dtype)]
    if path.is_dir():
        try:
            text_model = load_text_model(path)
        except CheckpointError:
            text_model = None  # a plain backbone's run
        if text_model is not None:
            exported += export_text_aligned(text_model, out, resolution, dynamic, dtype)
    say(f"exported in {time.perf_counter() - started:.1f} s")
    if check:
        for item in exported:
            item.max_diff = check_onnx(item.path, item.module, item.check_inputs)
            if item.max_diff > TOLERANCE[dtype]:
                raise RuntimeError(
                    f"{item.path}: onnxruntime differs from PyTorch by {item.max_diff:.2e} "
                    f"(more than {TOLERANCE[dtype]:g} for {dtype})"
                )
    return [item.describe() for item in exported]
