"""The official-fixture harness reads what a key means: synthetic fixtures (no official files needed) with key
variants that no official file has, generated from our own code, are interpreted and compared; a key it cannot
interpret, or a value it would skip, fails."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from opendino.data.collate import collate_masks
from opendino.data.masking import BlockMaskGenerator
from opendino.losses import SoftmaxCenter, sinkhorn_knopp
from opendino.models.convnext import ConvNeXt
from opendino.models.vit import DinoVisionTransformer
from tests.official_harness import check_data

VIT_KWARGS = dict(
    img_size=64,
    patch_size=16,
    embed_dim=32,
    depth=3,
    num_heads=2,
    ffn_layer="swiglu",
    norm_layer="layernormbf16",
    layerscale_init=0.3,
    n_storage_tokens=2,
    mask_k_bias=True,
    pos_embed_rope_dtype="fp32",
)


@pytest.fixture(scope="module")
def vit_fixture() -> dict:
    """A ``vit`` file with intermediate-layer calls of other forms than the official files'."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(**VIT_KWARGS).eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    gil = model.get_intermediate_layers
    with torch.no_grad():
        outputs = {
            "forward_features": {k: v for k, v in model.forward_features(x).items() if k != "masks"},
            "forward": model(x),
            # new key-grammar variants (no `calls` entry)
            "gil_n1_reshape_nonorm_cls": [
                cls for _, cls in gil(x, n=1, reshape=True, norm=False, return_class_token=True)
            ],
            "gil_layers0_2_flat_norm_extra": [e for _, e in gil(x, n=[0, 2], return_extra_tokens=True)],
            # a call recorded in `calls` only, under a free name, returning whole tuples
            "gil_first_two_blocks": gil(x, n=[0, 1], reshape=True, return_class_token=True, norm=False),
            # a recorded call, then `same with` (the official files' style) with other arguments
            "gil_n3_flat_norm": gil(x, n=3),
            "gil_n3_flat_norm_cls": [c for _, c, _ in gil(x, n=3, return_class_token=True, return_extra_tokens=True)],
            "gil_n3_flat_norm_extra": [e for _, _, e in gil(x, n=3, return_class_token=True, return_extra_tokens=True)],
        }
        sin, cos = model.rope_embed(2, 3)
    calls = {
        "gil_first_two_blocks": "model.get_intermediate_layers(x, n=[0, 1], reshape=True, return_class_token=True, "
        "norm=False) -> 2 x (patches, cls)",
        "gil_n3_flat_norm": "model.get_intermediate_layers(x, n=3) -> 3 x [B, h*w, D]",
        "gil_n3_flat_norm_cls/extra": "same with return_class_token=True, return_extra_tokens=True",
    }
    return {
        "kind": "vit",
        "provenance": {"made_by": "tests/test_official_harness.py"},
        "model_kwargs": VIT_KWARGS,
        "state_dict": model.state_dict(),
        "inputs": {"x32x48": x},
        "outputs": {"x32x48": outputs},
        "rope_eval": {"H2W3_sin": sin, "H2W3_cos": cos},
        "calls": calls,
    }


def perturbed(data: dict, path: tuple, delta: float = 1e-3) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    value = node[path[-1]]
    node[path[-1]] = type(value)(v + delta for v in value) if isinstance(value, (list, tuple)) else value + delta
    return data


def test_new_vit_key_variants_are_interpreted(vit_fixture):
    check_data(vit_fixture)


@pytest.mark.parametrize(
    "key",
    [
        "gil_n1_reshape_nonorm_cls",
        "gil_layers0_2_flat_norm_extra",
        "gil_n3_flat_norm",
        "gil_n3_flat_norm_cls",
        "gil_n3_flat_norm_extra",
        "forward",
    ],
)
def test_new_vit_key_variants_are_compared(vit_fixture, key):
    with pytest.raises(AssertionError, match=re.escape(f"outputs.x32x48.{key}")):
        check_data(perturbed(vit_fixture, ("outputs", "x32x48", key)))


def test_a_call_recorded_under_a_free_name_is_run_and_compared(vit_fixture):
    data = copy.deepcopy(vit_fixture)
    data["outputs"]["x32x48"]["gil_first_two_blocks"][1][0].add_(1e-3)  # block 1, patches
    with pytest.raises(AssertionError, match=re.escape("gil_first_two_blocks[1][0]")):
        check_data(data)
    del data["calls"]["gil_first_two_blocks"]  # now nothing says what it means
    with pytest.raises(AssertionError, match="'gil_first_two_blocks': no recorded get_intermediate_layers call"):
        check_data(data)


def test_a_bfloat16_state_dict_loads_into_float32_parameters():
    torch.manual_seed(0)
    model = DinoVisionTransformer(**VIT_KWARGS).eval()
    with torch.no_grad():
        for t in model.state_dict().values():  # the values a bfloat16 state dict holds (buffers too)
            t.copy_(t.bfloat16())
        x = torch.randn(1, 3, 32, 32)
        expected = model(x)
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    data = {"kind": "vit", "model_kwargs": VIT_KWARGS, "state_dict": state}
    data.update(inputs={"x": x}, outputs={"x": {"forward": expected}})
    check_data(data)


def test_new_rope_grid_is_compared(vit_fixture):
    with pytest.raises(AssertionError, match=r"rope_eval\.H2W3_cos"):
        check_data(perturbed(vit_fixture, ("rope_eval", "H2W3_cos")))


def test_a_recorded_call_contradicting_its_key_is_an_error(vit_fixture):
    data = copy.deepcopy(vit_fixture)
    data["calls"]["gil_n3_flat_norm"] = "model.get_intermediate_layers(x, n=3, norm=False)"
    with pytest.raises(AssertionError, match="the key says norm=True, its recorded call norm=False"):
        check_data(data)


@pytest.mark.parametrize(
    "where, key, message",
    [
        (("outputs", "x32x48"), "forward_features_v2", "cannot interpret output 'forward_features_v2'"),
        (("outputs", "x32x48"), "gil_n2_sideways_norm", "no recorded get_intermediate_layers call"),
        (("rope_eval",), "H2W3_tan", "cannot interpret rope_eval key 'H2W3_tan'"),
        ((), "attention_maps", r"values no check interpreted .*: attention_maps"),
        (
            ("outputs", "x32x48", "forward_features"),
            "x_norm_regtokens",
            "forward_features: missing output 'x_norm_regtokens'",
        ),
    ],
)
def test_a_key_the_harness_cannot_interpret_fails(vit_fixture, where, key, message):
    data = copy.deepcopy(vit_fixture)
    node = data
    for part in where:
        node = node[part]
    node[key] = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match=message):
        check_data(data)


def test_new_convnext_patch_size_and_call_are_interpreted():
    torch.manual_seed(0)
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], layer_scale_init_value=0.5)
    model = ConvNeXt(**kwargs).eval()
    p32 = ConvNeXt(**kwargs, patch_size=32).eval()
    p32.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outputs = {
            "forward": model(x),
            "patch_size_32": {
                "gil_list02_reshape_norm_cls": p32.get_intermediate_layers(
                    x, n=[0, 2], reshape=True, return_class_token=True
                )
            },
        }
    data = {"kind": "convnext", "model_kwargs": {**kwargs, "patch_size": None}, "patch_size_variant": 32}
    data.update(state_dict=model.state_dict(), inputs={"x": x}, outputs={"x": outputs})
    check_data(data)
    wrong = copy.deepcopy(data)
    wrong["outputs"]["x"]["patch_size_32"]["gil_list02_reshape_norm_cls"][1][1].add_(1e-3)
    with pytest.raises(AssertionError, match=re.escape("patch_size_32.gil_list02_reshape_norm_cls[1][1]")):
        check_data(wrong)
    missing = copy.deepcopy(data)
    missing["patch_size_variant"] = 16  # the file says it has outputs for patch size 16: they must be there
    with pytest.raises(AssertionError, match="no patch_size_16 outputs"):
        check_data(missing)


@pytest.fixture(scope="module")
def losses_fixture() -> dict:
    """A ``losses`` file with softmax-centre probes and a Sinkhorn-Knopp teacher at temperatures no official
    file has."""
    g = torch.Generator().manual_seed(5)
    constants = dict(
        B=2,
        n_global_crops=2,
        n_local_crops=1,
        K_dino=16,
        grid=3,
        n_tokens=9,
        student_temp=0.1,
        center_momentum=0.8,
        sinkhorn_knopp_n_iterations=3,
        mask_ratio_min_max=[0.1, 0.5],
        mask_sample_probability=0.5,
    )
    teacher = 0.3 * torch.randn(4, 16, generator=g)
    start = 0.1 * torch.randn(1, 16, generator=g)
    center = SoftmaxCenter(16, momentum=0.8)
    center.center.copy_(start)
    softmax_center = {
        "center": start.clone(),
        **{f"probs_T{t}": center.probs(teacher, float(t)) for t in ("0.05", "0.1")},
    }
    center.update(teacher)
    softmax_center["center_after_update"] = center.center.clone()
    gen = BlockMaskGenerator((3, 3), max_num_patches=4.5, seed=0)
    collate = collate_masks(4, 9, gen)
    collate["seeds"] = "random.seed(0); np.random.seed(0)"
    return {
        "kind": "losses",
        "constants": constants,
        "collate": collate,
        "inputs": {"teacher_cls_logits": teacher, "center_dino": start},
        "dino": {
            "softmax_center": softmax_center,
            "T0.055": {"sk_centered": sinkhorn_knopp(teacher, 0.055, 3).unflatten(0, (2, 2))},
        },
    }


def test_new_temperatures_are_interpreted(losses_fixture):
    check_data(losses_fixture)


@pytest.mark.parametrize(
    "path",
    [
        ("dino", "softmax_center", "probs_T0.05"),
        ("dino", "softmax_center", "probs_T0.1"),
        ("dino", "softmax_center", "center_after_update"),
        ("dino", "T0.055", "sk_centered"),
    ],
)
def test_new_temperatures_are_compared(losses_fixture, path):
    with pytest.raises(AssertionError, match=re.escape(".".join(path))):
        check_data(perturbed(losses_fixture, path))


def test_the_temperature_comes_from_the_key(losses_fixture):
    data = copy.deepcopy(losses_fixture)
    sc = data["dino"]["softmax_center"]
    sc["probs_T0.07"] = sc.pop("probs_T0.05")  # the values of T=0.05 under another temperature
    with pytest.raises(AssertionError, match=re.escape("dino.softmax_center.probs_T0.07")):
        check_data(data)


@pytest.mark.parametrize(
    "path, message",
    [
        (("dino", "softmax_center", "entropy_T0.05"), "cannot interpret key 'entropy_T0.05'"),
        (("dino", "T0.055", "sk_centred_twice"), "cannot interpret output 'sk_centred_twice'"),
        (("dino", "Tcold"), "cannot interpret key 'Tcold'"),
        (("sinkhorn",), "cannot interpret section 'sinkhorn'"),
        (("collate", "mask_boxes"), "cannot interpret collate output 'mask_boxes'"),
    ],
)
def test_a_loss_key_the_harness_cannot_interpret_fails(losses_fixture, path, message):
    data = copy.deepcopy(losses_fixture)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = {"sk_centered": torch.zeros(1)} if path == ("dino", "Tcold") else torch.zeros(1)
    with pytest.raises(AssertionError, match=message):
        check_data(data)
