"""Text alignment models: a CLIP-style text tower, the dino.txt vision head, and the aligned pair.

Facts implemented (docs/design/recipe.md §5): the text tower is a causal pre-norm transformer with a learned
position embedding, pooled at the end-of-text token (the largest token id, so ``argmax`` finds it) and
projected without bias; the vision head runs two self-attention blocks (no RoPE) over the frozen backbone's
[cls, storage, patch] tokens, a final LayerNorm, and outputs ``cat(head_cls, mean(head_patches))``. The
head's patch outputs are kept: their product with the second half of a text embedding is each patch's share
of the image-text similarity, which is what open-vocabulary segmentation reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.models.vit import NORM_LAYERS, Block, LayerScale, drop_path_subsets

VOCAB_SIZE = 49_408  # the CLIP BPE vocabulary; the end-of-text token is its last id


@dataclasses.dataclass(frozen=True)
class TextGeometry:
    width: int
    layers: int
    heads: int
    embed_dim: int  # the output (shared image-text) dimension
    context_length: int = 77


# Named text towers: the released dino.txt geometry (recipe facts §5) and sizes for a CPU.
TEXT_TOWERS: dict[str, TextGeometry] = {
    "text_dinotxt": TextGeometry(1280, 24, 20, 2048),
    "text_base": TextGeometry(512, 12, 8, 1024),  # CLIP ViT-B/16's text width and depth
    "text_small": TextGeometry(256, 6, 4, 512),
    "text_tiny": TextGeometry(128, 3, 4, 256),
}


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention (qkv without bias, projection with bias)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class TextTransformer(nn.Module):
    """Token ids ``[B, context]`` -> text embeddings ``[B, embed_dim]`` (not normalised)."""

    def __init__(
        self,
        *,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        embed_dim: int = 1024,
        context_length: int = 77,
        vocab_size: int = VOCAB_SIZE,
        mlp_ratio: float = 4.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width={width} is not divisible by heads={heads}")
        self.kwargs = dict(width=width, layers=layers, heads=heads, embed_dim=embed_dim)
        self.kwargs.update(context_length=context_length, vocab_size=vocab_size, mlp_ratio=mlp_ratio)
        self.width, self.n_layers, self.context_length, self.embed_dim = width, layers, context_length, embed_dim
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.token_embedding = nn.Embedding(vocab_size, width)
            self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
            self.blocks = nn.ModuleList(CausalBlock(width, heads, mlp_ratio) for _ in range(layers))
            self.ln_final = nn.LayerNorm(width, eps=1e-5)
            self.projection = nn.Linear(width, embed_dim, bias=False)
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation as dino.txt uses it (docs/design/recipe.md §5); residual outputs scaled by
        ``(2 L)^-1/2`` so the residual stream's variance does not grow with depth."""
        width, depth = self.width, self.n_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        residual_std = width**-0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.proj.weight, std=residual_std)
            nn.init.normal_(block.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.fc2.weight, std=residual_std)
            for linear in (block.proj, block.fc1, block.fc2):
                nn.init.zeros_(linear.bias)
            block.ln_1.reset_parameters()
            block.ln_2.reset_parameters()
        self.ln_final.reset_parameters()
        nn.init.normal_(self.projection.weight, std=width**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # the end-of-text token
        return self.projection(pooled)


def build_text_tower(name: str, **overrides) -> TextTransformer:
    """A named text tower (``TEXT_TOWERS``), with sizes overridden (``embed_dim=...``)."""
    if name not in TEXT_TOWERS:
        raise ValueError(f"unknown text tower {name!r}; known: {', '.join(TEXT_TOWERS)}")
    return TextTransformer(**{**dataclasses.asdict(TEXT_TOWERS[name]), **overrides})


class VisionHead(nn.Module):
    """The dino.txt vision head on a frozen backbone's tokens: ``blocks`` self-attention blocks without RoPE
    (SwiGLU aligned to 64, LayerScale, stochastic depth), a final LayerNorm, ``cat(cls, mean(patches))``.

    When ``embed_dim`` is not twice the backbone width (or ``linear_projection``), each half has its own
    bias-free projection to ``embed_dim / 2``. ``blocks=0`` is the plain CLIP image projection of the
    backbone's normalised tokens."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        embed_dim: int | None = None,
        blocks: int = 2,
        ffn_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        linear_projection: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        embed_dim = embed_dim or 2 * dim
        self.kwargs = dict(dim=dim, num_heads=num_heads, embed_dim=embed_dim, blocks=blocks, ffn_ratio=ffn_ratio)
        self.kwargs.update(drop_path_rate=drop_path_rate, linear_projection=linear_projection)
        if embed_dim % 2:
            raise ValueError(f"the vision head's embed_dim={embed_dim} must be even (cls half, patch half)")
        self.dim, self.embed_dim, self.drop_path_rate = dim, embed_dim, drop_path_rate
        block_kwargs = dict(
            ffn_hidden=int(dim * ffn_ratio),
            ffn_layer="swiglu64",
            norm_layer="layernormbf16",
            qkv_bias=False,
            proj_bias=True,
            ffn_bias=True,
            mask_k_bias=False,
            layerscale_init=1e-5,
        )
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.blocks = nn.ModuleList(Block(dim, num_heads, **block_kwargs) for _ in range(blocks))
            self.ln_final = NORM_LAYERS["layernormbf16"](dim)
            self.cls_projection = self.patch_projection = None
            if linear_projection or embed_dim != 2 * dim or not blocks:  # blocks=0: CLIP's image projection
                self.cls_projection = nn.Linear(dim, embed_dim // 2, bias=False)
                self.patch_projection = nn.Linear(dim, embed_dim // 2, bias=False)
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    def forward(self, tokens: Tensor, n_prefix: int) -> tuple[Tensor, Tensor]:
        """``tokens``: ``[B, n_prefix + N, dim]`` (cls, storage, patches) -> the image embedding ``[B, embed_dim]``
        and the patch embeddings ``[B, N, embed_dim / 2]`` (neither normalised)."""
        xs = [tokens]
        n = len(self.blocks)
        subsets = [None] * n
        if self.training and self.drop_path_rate > 0 and n:
            rows = drop_path_subsets([tokens.shape[0]], self.drop_path_rate, 2 * n, tokens.device)
            subsets = [(rows[2 * i], rows[2 * i + 1]) for i in range(n)]
        for block, rows in zip(self.blocks, subsets, strict=True):
            xs = block(xs, [None], rows)
        x = self.ln_final(xs[0])
        cls, patches = x[:, 0], x[:, n_prefix:]
        if self.cls_projection is not None:
            cls, patches = self.cls_projection(cls), self.patch_projection(patches)
        return torch.cat([cls, patches.mean(dim=1)], dim=-1), patches


def backbone_tokens(backbone: nn.Module, images: Tensor) -> Tensor:
    """The backbone's normalised last-layer tokens ``[B, 1 + storage + N, D]`` (cls, storage, patches)."""
    out = backbone.forward_features(images)
    return torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


class TextAlignedModel(nn.Module):
    """An image backbone, a vision head and a text tower in one embedding space, with the logit scale
    (and SigLIP's bias) they were trained with. Embeddings are L2-normalised, in float32.

    ``forward(tokens, images=None, image_tokens=None)`` is the training call (one call, so data parallelism
    sees every use of the weights): the backbone runs on ``images`` unless its tokens are given
    (precomputed for a locked backbone); returns the image, patch and text embeddings, normalised."""

    def __init__(
        self,
        backbone: nn.Module,
        head: VisionHead,
        text: TextTransformer,
        *,
        logit_scale: float = math.log(1 / 0.07),
        logit_bias: float | None = None,
        locked: bool = True,
    ) -> None:
        super().__init__()
        self.backbone, self.head, self.text = backbone, head, text
        # shape [1], not 0-dim: FSDP2 shards no scalar parameters
        self.logit_scale = nn.Parameter(torch.tensor([float(logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(logit_bias)])) if logit_bias is not None else None
        self.locked = locked
        self.n_prefix = 1 + getattr(backbone, "n_storage_tokens", 0)
        self.tokenizer = None  # set on first use of encode_text (open_clip's BPE)
        self.dense_projection: nn.Linear | None = None  # the PE-style variant's, a training-only part

    def image_tokens(self, images: Tensor) -> Tensor:
        if self.locked:
            with torch.no_grad():
                return backbone_tokens(self.backbone, images)
        return backbone_tokens(self.backbone, images)

    def embed_images(self, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised image and patch embeddings of backbone tokens."""
        image, patches = self.head(image_tokens, self.n_prefix)
        return F.normalize(image.float(), dim=-1), F.normalize(patches.float(), dim=-1)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens).float(), dim=-1)

    def forward(
        self, tokens: Tensor, images: Tensor | None = None, image_tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Image, patch and text embeddings (normalised) and the backbone tokens they came from."""
        if image_tokens is None:
            image_tokens = self.image_tokens(images)
        image, patches = self.embed_images(image_tokens.to(self.head.ln_final.weight.dtype))
        return image, patches, self.embed_tokens(tokens), image_tokens

    # -- inference API ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        if self.tokenizer is None:
            from opendino.data.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(self.text.context_length)
        return self.tokenizer(list(texts)).to(self.logit_scale.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | Tensor) -> Tensor:
        """Normalised text embeddings ``[N, embed_dim]`` of strings (or token ids)."""
        tokens = texts if isinstance(texts, Tensor) else self.tokenize([texts] if isinstance(texts, str) else texts)
        return self.embed_tokens(tokens)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Normalised image embeddings ``[B, embed_dim]`` of normalised images ``[B, 3, H, W]``."""
        return self.embed_images(backbone_tokens(self.backbone, images))[0]

    @torch.no_grad()
    def encode_image_dense(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised image embeddings ``[B, E]`` and patch embeddings on the token grid ``[B, h, w, E/2]``."""
        stride = getattr(self.backbone, "feature_stride", 16)
        image, patches = self.embed_images(backbone_tokens(self.backbone, images))
        return image, patches.unflatten(1, (images.shape[-2] // stride, images.shape[-1] // stride))

    def patch_text_similarity(self, patches: Tensor, text: Tensor) -> Tensor:
        """Each patch's share of the image-text similarity: patch embeddings ``[..., E/2]`` against the patch
        half of text embeddings ``[C, E]`` (renormalised) -> ``[..., C]``."""
        return patches @ F.normalize(text[:, text.shape[1] // 2 :], dim=-1).T


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


TEXT_EXPORT = "text.safetensors"  # beside the run's teacher.safetensors (the image backbone)
TEXT_METADATA_KEY = "opendino_text"


def save_text_model(model: TextAlignedModel, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Writes the text-aligned parts (vision head, text tower, logit scale and bias) as safetensors with their
    constructor arguments; the backbone is written on its own (``save_model``)."""
    from safetensors.torch import save_file

    meta = {"head": model.head.kwargs, "text": model.text.kwargs, "locked": model.locked}
    state = model.state_dict() if state is None else state
    training_only = ("backbone.", "dense_projection.")
    weights = {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith(training_only)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={TEXT_METADATA_KEY: json.dumps(meta)})


def load_text_model(source: str | Path, device: torch.device | str | None = None) -> TextAlignedModel:
    """A text-aligned model from a run folder of the text recipe (its ``teacher.safetensors`` and
    ``text.safetensors``), or from a ``text.safetensors`` file with its ``teacher.safetensors`` beside it."""
    from safetensors import safe_open

    from opendino.models.checkpoint import CheckpointError, load_model

    path = Path(source)
    text_file = path / TEXT_EXPORT if path.is_dir() else path
    if not text_file.is_file():
        raise CheckpointError(
            f"{source} has no text tower ({TEXT_EXPORT}): text tasks (zeroshot, retrieval, ovseg) need a model "
            "trained with the text recipe (`opendino train configs/text/demo.yaml init.backbone=RUN`)"
        )
    with safe_open(str(text_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get(TEXT_METADATA_KEY, "null") or "null")
    if meta is None:
        raise CheckpointError(f"{text_file}: not a text model written by OpenDINO (no {TEXT_METADATA_KEY} metadata)")
    from opendino.runs import EXPORT

    backbone = load_model(text_file.parent / EXPORT, device=device)
    head = VisionHead(**meta["head"], device="meta")
    text = TextTransformer(**meta["text"], device="meta")
    bias = 0.0 if "logit_bias" in state else None
    model = TextAlignedModel(backbone, head, text, logit_bias=bias, locked=meta["locked"])
    for module in (model.head, model.text):
        module.to_empty(device=device or "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"{text_file}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device or "cpu").eval()
