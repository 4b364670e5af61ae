"""Text alignment: named geometries, the contrastive losses against direct computations, and 2 gloo ranks
giving the gradients of one process holding the global batch."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from opendino.losses import clip_loss, siglip_loss
from opendino.models.text import TEXT_TOWERS, VisionHead, build_text_tower, count_parameters


def test_named_geometries_have_the_parameter_counts_of_the_recipe_facts():
    # docs/design/recipe.md §5: a ~538M text tower and a ~25.3M vision head for ViT-L
    assert abs(count_parameters(build_text_tower("text_dinotxt", device="meta")) / 1e6 - 538) < 1
    assert abs(count_parameters(VisionHead(1024, num_heads=16, device="meta")) / 1e6 - 25.3) < 0.1
    geometry = TEXT_TOWERS["text_dinotxt"]
    assert (geometry.width, geometry.layers, geometry.heads, geometry.context_length) == (1280, 24, 20, 77)
    assert geometry.embed_dim == 2048


def test_the_text_tower_pools_at_the_end_of_text_token_and_is_causal():
    torch.manual_seed(0)
    tower = build_text_tower("text_tiny", embed_dim=16).eval()
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, :4] = torch.tensor([49406, 320, 1125, 49407])
    changed = tokens.clone()
    changed[1, 10] = 555  # after the end-of-text token: invisible to a causal tower pooled there
    out, out_changed = tower(tokens), tower(changed)
    torch.testing.assert_close(out, out_changed)
    changed[1, 2] = 556  # before it: changes the embedding
    assert not torch.allclose(tower(changed)[1], out[1])


def _reference_clip(image, text, scale):
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    n = logits.shape[0]
    rows = -torch.log_softmax(logits, 1)[range(n), range(n)].mean()
    cols = -torch.log_softmax(logits, 0)[range(n), range(n)].mean()
    return (rows + cols) / 2


def _reference_siglip(image, text, scale, bias):
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + bias
    total = 0.0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            z = 1.0 if i == j else -1.0
            total = total - math.log(1 / (1 + math.exp(-z * logits[i, j].item())))
    return total / logits.shape[0]


def test_losses_equal_direct_computations():
    torch.manual_seed(1)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    scale, bias = torch.tensor(math.log(1 / 0.07)), torch.tensor(-10.0)
    n_image, n_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    torch.testing.assert_close(clip_loss(n_image, n_text, scale), _reference_clip(image, text, scale))
    assert siglip_loss(n_image, n_text, torch.tensor(math.log(10)), bias).item() == pytest.approx(
        _reference_siglip(image, text, torch.tensor(math.log(10)), bias), rel=1e-5
    )
    # bf16 inputs are scored in float32
    assert clip_loss(n_image.bfloat16(), n_text.bfloat16(), scale).dtype == torch.float32


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    image_net, text_net = torch.nn.Linear(5, 8), torch.nn.Linear(7, 8)
    images, texts = torch.randn(8, 5), torch.randn(8, 7)
    return image_net, text_net, images, texts


def _loss(kind, image_net, text_net, images, texts, scale, bias):
    image, text = F.normalize(image_net(images), dim=-1), F.normalize(text_net(texts), dim=-1)
    return clip_loss(image, text, scale) if kind == "clip" else siglip_loss(image, text, scale, bias)


def _grads(nets, scale, bias):
    extra = [t.grad.clone() if t.grad is not None else torch.zeros(()) for t in (scale, bias)]  # clip has no bias
    return [p.grad.clone() for net in nets for p in net.parameters()] + extra


def _rank_worker(rank: int, port: int, kind: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    image_net, text_net, images, texts = _model_and_data()
    scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    mine = slice(rank * 4, rank * 4 + 4)
    _loss(kind, image_net, text_net, images[mine], texts[mine], scale, bias).backward()
    grads = _grads((image_net, text_net), scale, bias)
    for g in grads:  # what data parallelism does: average the gradients over the ranks
        dist.all_reduce(g)
        g /= 2
    queue.put((rank, [g.numpy() for g in grads]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_ranks_give_the_gradients_of_one_process_with_the_global_batch(kind):
    image_net, text_net, images, texts = _model_and_data()
    scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    _loss(kind, image_net, text_net, images, texts, scale, bias).backward()
    expected = _grads((image_net, text_net), scale, bias)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, kind, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for got in results.values():
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-5, atol=1e-6)
    # without the other rank's embeddings the gradients would differ: the test can tell
    local = _model_and_data()
    s2, b2 = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    _loss(kind, local[0], local[1], local[2][:4], local[3][:4], s2, b2).backward()
    assert not torch.allclose(_grads(local[:2], s2, b2)[0], expected[0], atol=1e-4)
