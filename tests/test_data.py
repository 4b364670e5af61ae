"""Sources, bad files, the resumable sharded loader, collate layout and augmentation statistics."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from opendino.data.augment import (
    GLOBAL_1,
    GLOBAL_2,
    LOCAL,
    CropConfig,
    MultiCrop,
    _distort_indexed,
    _distort_masked,
    _rrc_params,
    photometric,
    resized_crops,
    sample_photometric_params,
)
from opendino.data.loader import MultiCropDataset, SampleRef, StepBatchSampler, build_ssl_loader, pad_stack
from opendino.data.sources import (
    FolderSource,
    ListSource,
    NoImagesError,
    SyntheticSource,
    TarShardSource,
    decode_image,
    open_source,
)


def _rgb(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture()
def messy_folder(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    _rgb().save(tmp_path / "cats" / "ok.jpg")
    _rgb(seed=1).save(tmp_path / "dogs" / "ok.png")
    (tmp_path / "cats" / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _rgb().save(buf, "JPEG")
    (tmp_path / "cats" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (tmp_path / "dogs" / "text.png").write_text("not an image")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_decodes_every_kind_of_odd_image(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (20, 10), 3).save(tmp_path / "palette.png")
    Image.new("L", (20, 10), 77).save(tmp_path / "gray.png")
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((10, 20), 65535 // 2, dtype=np.uint16)).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _rgb(40, 30).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (5000, 50), (9, 9, 9)).save(tmp_path / "huge.jpg")
    shapes = {p.name: decode_image(p).shape for p in sorted(tmp_path.iterdir())}
    assert shapes["cmyk.jpg"] == shapes["palette.png"] == shapes["gray.png"] == shapes["rgba.png"] == (3, 10, 20)
    assert shapes["rotated.jpg"] == (3, 40, 30)
    assert max(shapes["huge.jpg"]) <= 4096
    deep = decode_image(tmp_path / "deep.png")
    assert abs(int(deep[0, 0, 0]) - 127) <= 1  # 16-bit mid-grey becomes 8-bit mid-grey, not clipped white
    assert decode_image(tmp_path / "gray.png")[:, 0, 0].tolist() == [77, 77, 77]


def test_folder_source_classes_and_bad_files(messy_folder):
    src = open_source(messy_folder)
    assert isinstance(src, FolderSource) and src.classes == ["cats", "dogs"]
    assert len(src) == 5  # notes.txt is not listed
    loaded = {src.path(i).split("/")[-1]: src.load(i) for i in range(len(src))}
    assert {k for k, v in loaded.items() if v is None} == {"empty.jpg", "truncated.jpg", "text.png"}
    assert {src.label(i) for i in range(len(src))} == {0, 1}


def test_unreadable_folder_is_an_early_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(NoImagesError, match="can be decoded"):
        open_source(tmp_path).check_readable()
    (tmp_path / "a.jpg").unlink()
    with pytest.raises(NoImagesError, match="no images found"):
        open_source(tmp_path).check_readable()


def test_list_and_tar_sources(tmp_path):
    for i in range(3):
        _rgb(seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("path,label\n0.png,2\n1.png,5\n")
    src = open_source(tmp_path / "l.csv")
    assert isinstance(src, ListSource) and [src.label(i) for i in range(2)] == [2, 5]
    (tmp_path / "named.csv").write_text("0.png,dog\n1.png,cat\n2.png\n")  # names numbered like folder classes
    src = open_source(tmp_path / "named.csv")
    assert src.classes == ["cat", "dog"] and [src.label(i) for i in range(3)] == [1, 0, -1]
    _rgb(seed=9).save(tmp_path / "a,b.png")
    (tmp_path / "l.txt").write_text("a,b.png\n\n 2.png\n")  # a .txt line is a whole path, commas included
    src = open_source(tmp_path / "l.txt")
    assert [Path(src.path(i)).name for i in range(2)] == ["a,b.png", "2.png"]
    assert src.load(0) is not None and src.label(0) == -1
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(3):
            tar.add(tmp_path / f"{i}.png", arcname=f"sample{i}.png")
            data = str(i).encode()
            info = tarfile.TarInfo(f"sample{i}.cls")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = open_source(str(tmp_path / "shard-*.tar"))
    assert isinstance(shards, TarShardSource) and len(shards) == 3
    assert torch.equal(shards.load(1), decode_image(tmp_path / "1.png")) and shards.label(2) == 2
    with pytest.raises(ValueError, match="valid: folder, list, tar, synthetic"):
        open_source(tmp_path, source="imagenet")
    # tmp_path holds shards and images: ambiguous unless data.source says which
    with pytest.raises(ValueError, match="set data.source=tar or data.source=folder"):
        open_source(tmp_path)
    assert isinstance(open_source(tmp_path, "tar"), TarShardSource) and len(open_source(tmp_path, "tar")) == 3
    assert isinstance(open_source(tmp_path, "folder"), FolderSource)
    assert isinstance(open_source(tmp_path / "shard-000.tar"), TarShardSource)
    with pytest.raises(ValueError, match="needs a .txt or .csv file"):
        open_source(tmp_path, "list")
    (tmp_path / "no-shards").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .tar shards"):
        open_source(tmp_path / "no-shards", "tar")


def test_sampler_shards_ranks_like_one_big_batch_and_resumes():
    one = StepBatchSampler(50, 8, seed=3)
    ranks = [StepBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(10):
        assert one.batch_at(step) == ranks[0].batch_at(step) + ranks[1].batch_at(step)
    resumed = iter(StepBatchSampler(50, 8, seed=3, start_step=4))
    assert next(resumed) == one.batch_at(4)
    epoch = [ref.index for step in range(25) for ref in one.batch_at(step)][:50]
    assert sorted(epoch) == list(range(50))  # an epoch visits every image once


def test_sample_seeds_stay_distinct_past_32_bit_positions():
    sampler = StepBatchSampler(10, 4096, seed=0)
    late = sampler.batch_at(2**32 // 4096)  # the first step whose positions pass 2**32
    early = sampler.batch_at(0)
    assert all(a.seed != b.seed for a, b in zip(late, early, strict=True))


def test_crop_set_choice_is_shared_by_ranks_and_follows_probabilities():
    probs = (0.3, 0.3, 0.3, 0.05, 0.05)
    a = StepBatchSampler(10, 2, crop_set_probs=probs, rank=0, world_size=2)
    b = StepBatchSampler(10, 2, crop_set_probs=probs, rank=1, world_size=2)
    choices = [a.crop_set_at(s) for s in range(4000)]
    assert choices == [b.crop_set_at(s) for s in range(4000)]
    freq = np.bincount(choices, minlength=5) / 4000
    assert np.allclose(freq, probs, atol=0.03)
    other_seed = StepBatchSampler(10, 2, crop_set_probs=probs, seed=1)
    assert [other_seed.crop_set_at(s) for s in range(4000)] != choices  # the sequence follows train.seed


def test_bad_images_are_replaced_deterministically_and_reported(messy_folder):
    src = open_source(messy_folder)
    ds = MultiCropDataset(src, [CropConfig(global_size=32, local_size=16, n_local=2)])
    bad = next(i for i in range(len(src)) if src.load(i) is None)
    sample = ds[SampleRef(bad, seed=0, crop_set=0)]
    assert sample["skipped"] and sample["skipped"][0] == src.path(bad)


def test_loader_batches_are_crop_major_and_resume_exactly():
    src = SyntheticSource(n=40, size=64)
    cfg = CropConfig(global_size=32, local_size=16, n_local=3)
    loader = iter(build_ssl_loader(src, [cfg], batch_size=4, seed=1))
    batches = [next(loader) for _ in range(3)]
    b = batches[0]
    assert b["global"].shape == (8, 3, 32, 32) and b["local"].shape == (12, 3, 16, 16)
    assert b["collated_masks"].shape == (8, 4) and b["n_masked_patches"].item() == len(b["mask_indices_list"])
    # Crop-major: the first B rows are crop 0 of each image, rows B.. are crop 1 of the same images.
    ds = MultiCropDataset(src, [cfg])
    refs = StepBatchSampler(40, 4, seed=1).batch_at(0)
    first = ds[refs[1]]
    assert torch.equal(b["global"][1], first["global"][0]) and torch.equal(b["global"][5], first["global"][1])
    assert torch.equal(b["local"][4 + 1], first["local"][1])
    resumed = next(iter(build_ssl_loader(src, [cfg], batch_size=4, seed=1, start_step=2)))
    for key in ("global", "local", "collated_masks", "labels"):
        assert torch.equal(resumed[key], batches[2][key])


def test_loader_with_workers_matches_in_process():
    src = SyntheticSource(n=20, size=48)
    cfg = CropConfig(global_size=32, local_size=16, n_local=2)
    a = next(iter(build_ssl_loader(src, [cfg], batch_size=2, seed=5)))
    b = next(iter(build_ssl_loader(src, [cfg], batch_size=2, seed=5, num_workers=2)))
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["collated_masks"], b["collated_masks"])


@pytest.mark.parametrize("policy,blur,solarize", [(GLOBAL_1, 0.0, 0.0), (GLOBAL_2, 0.9, 0.2), (LOCAL, 0.5, 0.0)])
def test_photometric_probabilities_match_the_official_recipe(policy, blur, solarize):
    p = sample_photometric_params(20000, policy, torch.Generator().manual_seed(0))
    assert p["jitter"].float().mean().item() == pytest.approx(0.8, abs=0.015)
    assert p["grayscale"].float().mean().item() == pytest.approx(0.2, abs=0.015)
    assert p["blur"].float().mean().item() == pytest.approx(blur, abs=0.015)
    assert p["solarize"].float().mean().item() == pytest.approx(solarize, abs=0.015)
    f = p["factors"]
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 3].abs().max() <= 0.1
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert sorted(p["order"][0].tolist()) == [0, 1, 2, 3]


def test_photometric_operations_do_what_they_say():
    x = torch.rand(6, 3, 16, 16)
    none = {k: v for k, v in sample_photometric_params(6, LOCAL).items()}
    none.update(
        jitter=torch.zeros(6, dtype=torch.bool),
        grayscale=torch.zeros(6, dtype=torch.bool),
        blur=torch.zeros(6, dtype=torch.bool),
        solarize=torch.zeros(6, dtype=torch.bool),
    )
    identity = photometric(x, LOCAL, (0, 0, 0), (1, 1, 1), params=none)
    assert torch.allclose(identity, x)
    gray = photometric(x, LOCAL, (0, 0, 0), (1, 1, 1), params={**none, "grayscale": torch.ones(6, dtype=torch.bool)})
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    blurred = photometric(x, LOCAL, (0, 0, 0), (1, 1, 1), params={**none, "blur": torch.ones(6, dtype=torch.bool)})
    assert blurred.std() < x.std()
    solar = photometric(x, GLOBAL_2, (0, 0, 0), (1, 1, 1), params={**none, "solarize": torch.ones(6, dtype=torch.bool)})
    assert torch.allclose(solar, torch.where(x >= 128 / 255, 1 - x, x))


@pytest.mark.parametrize("policy", [GLOBAL_1, GLOBAL_2, LOCAL])
def test_the_accelerator_path_distorts_exactly_like_the_per_crop_path(policy):
    """The masked (sync-free, compiled on GPUs) and the indexed (CPU) implementations are one function."""
    x = torch.rand(24, 3, 20, 20)
    params = sample_photometric_params(24, policy, torch.Generator().manual_seed(3))
    indexed = _distort_indexed(x.clone(), params, policy.solarize > 0)
    masked = _distort_masked(x.clone(), params, policy.solarize > 0)
    assert not torch.equal(indexed, x)
    torch.testing.assert_close(masked, indexed, rtol=0, atol=1e-6)


def test_random_resized_crop_scales_and_flips():
    rng = random.Random(0)
    fractions = []
    for _ in range(2000):
        top, left, h, w = _rrc_params(300, 400, (0.05, 0.32), rng)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        fractions.append(h * w / (300 * 400))
    assert 0.045 <= min(fractions) and max(fractions) <= 0.33 and np.mean(fractions) == pytest.approx(0.185, abs=0.02)
    ramp = torch.arange(64, dtype=torch.uint8).repeat(3, 64, 1)
    no_flip = MultiCrop(
        CropConfig(global_size=32, local_size=16, n_local=2, horizontal_flips=False, global_scale=(1, 1))
    )
    crops = no_flip.geometric(ramp, torch.Generator().manual_seed(0))["global"]
    assert (crops[:, 0, :, -1].float() > crops[:, 0, :, 0].float()).all()  # never flipped


def test_gram_crops_are_the_undistorted_base_crop_at_a_larger_size():
    cfg = CropConfig(global_size=32, local_size=16, n_local=2, gram_size=64)
    img = torch.from_numpy(np.array(_rgb(120, 90))).permute(2, 0, 1).contiguous()
    crops = MultiCrop(cfg).geometric(img, torch.Generator().manual_seed(0))
    assert crops["gram"].shape == (2, 3, 64, 64)
    down = torch.nn.functional.interpolate(crops["gram"].float(), size=32, mode="bilinear", antialias=True)
    assert (down - crops["global"].float()).abs().mean() < 12  # same content at two sizes
    out = MultiCrop(cfg).photometric(crops)
    assert out["gram"].shape == (2, 3, 64, 64) and out["global"].dtype == torch.float32


def test_batched_photometric_on_collated_uint8_crops():
    src = SyntheticSource(n=10, size=64)
    cfg = CropConfig(global_size=32, local_size=16, n_local=2, gram_size=48)
    batch = next(iter(build_ssl_loader(src, [cfg], batch_size=3, photometric_in_worker=False)))
    assert batch["global"].dtype == torch.uint8 and batch["gram"].shape == (6, 3, 48, 48)
    out = MultiCrop(cfg).photometric_collated(batch, torch.Generator().manual_seed(0))
    assert out["global"].shape == (6, 3, 32, 32) and out["global"].dtype == torch.float32
    assert out["local"].shape == (6, 3, 16, 16) and torch.equal(out["collated_masks"], batch["collated_masks"])
    # Gram crops are only normalised: undo the normalisation and get the uint8 crops back.
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    assert torch.allclose((out["gram"] * std + mean) * 255, batch["gram"].float(), atol=1e-3)


def _smooth_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """uint8 images with structure at several scales (noise alone hides resampling errors)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        coarse = torch.rand(1, 3, h // 4 + 1, w // 4 + 1, generator=g) * 255
        fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic").clamp(0, 255)
        out.append((fine[0] + 20 * torch.rand(3, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8))
    return out


@pytest.mark.parametrize("box", [(0, 0, 50, 70, 0), (5, 9, 31, 40, 1), (10, 3, 12, 9, 0), (0, 0, 7, 5, 1)])
def test_batched_resized_crops_are_torchvisions_float_resized_crop(box):
    """Downscale, upscale, flipped or not: two matrix products equal torchvision's antialiased bicubic."""
    img = _smooth_images([(50, 70)])[0].float()
    expected = TF.resized_crop(img, *box[:4], [24, 24], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    if box[4]:
        expected = TF.horizontal_flip(expected)
    padded = torch.nn.functional.pad(img, (0, 13, 0, 6))[None]  # padding must not leak into the crop
    out = resized_crops(padded, torch.tensor([[box]]), 24)[0, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("gram_size", [None, 48])
def test_crops_cut_on_the_device_are_the_workers_crops(gram_size):
    cfg = CropConfig(global_size=32, local_size=16, n_local=3, gram_size=gram_size)
    multicrop = MultiCrop(cfg)
    images = _smooth_images([(60, 90), (120, 80), (45, 45)])
    seeds = [torch.Generator().manual_seed(s) for s in range(3)]
    per_image = [multicrop.geometric(img, g) for img, g in zip(images, seeds, strict=True)]
    boxes = torch.stack(
        [multicrop.crop_boxes(*i.shape[-2:], torch.Generator().manual_seed(s)) for s, i in enumerate(images)]
    )
    assert boxes[..., 4].any() and not boxes[..., 4].all()  # both flipped and unflipped crops
    out = multicrop.geometric_collated({"images": pad_stack(images), "boxes": boxes, "labels": torch.arange(3)})
    assert torch.equal(out["labels"], torch.arange(3)) and "images" not in out
    for key in per_image[0]:
        expected = torch.stack([p[key] for p in per_image], 1).flatten(0, 1)  # crop-major
        assert out[key].dtype == torch.uint8 and out[key].shape == expected.shape
        diff = (out[key].int() - expected.int()).abs()
        # Float weights here; the CPU's two-pass uint8 kernel rounds and clamps between its passes (a few
        # levels off near black and white, where the bicubic kernel overshoots).
        assert (diff <= 1).float().mean() > 0.99 and diff.max() <= 8, key


def test_loader_with_crops_on_the_device_gives_the_same_batches():
    src = SyntheticSource(n=20, size=64)
    cfg = CropConfig(global_size=32, local_size=16, n_local=2, gram_size=48)
    kwargs = dict(batch_size=3, seed=2, photometric_in_worker=False)
    cut = next(iter(build_ssl_loader(src, [cfg], **kwargs)))
    whole = next(iter(build_ssl_loader(src, [cfg], crops_on_device=True, max_image_side=40, **kwargs)))
    assert whole["images"].shape == (3, 3, 40, 40) and whole["crop_set"] == 0  # reduced to max_image_side
    for key in ("collated_masks", "mask_indices_list", "labels"):
        assert torch.equal(whole[key], cut[key])
    out = MultiCrop(cfg).geometric_collated(whole)
    for key in ("global", "local", "gram"):
        assert out[key].shape == cut[key].shape
    full = next(iter(build_ssl_loader(src, [cfg], crops_on_device=True, **kwargs)))
    assert full["images"].shape == (3, 3, 64, 64)
    same = MultiCrop(cfg).geometric_collated(full)
    assert all(((same[k].int() - cut[k].int()).abs() <= 1).float().mean() > 0.99 for k in ("global", "local", "gram"))
    with pytest.raises(ValueError, match="photometric_on_device"):
        build_ssl_loader(src, [cfg], batch_size=3, crops_on_device=True)
    with pytest.raises(ValueError, match="max_image_side=0"):
        build_ssl_loader(src, [cfg], crops_on_device=True, max_image_side=0, **kwargs)


def test_a_synthetic_training_sample_renders_its_scene_once():
    from opendino.data.synthetic import render_scene

    src = SyntheticSource(n=8, size=48)
    calls = []
    src._render = lambda *args: calls.append(args[0]) or render_scene(*args)
    sample = MultiCropDataset(src, [CropConfig(global_size=32, local_size=16, n_local=2)])[
        SampleRef(3, seed=1, crop_set=0)
    ]
    assert calls == [3]  # image and label from one render
    assert sample["label"] == render_scene(3, 48).label


def _photo_folder(folder: Path) -> dict[str, Path]:
    """JPEGs the device decoder takes (one larger than max_image_side, one grey) and files it does not."""
    folder.mkdir()
    rng = np.random.default_rng(0)

    def photo(h, w):
        coarse = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)

    files = {
        "plain": ("a.jpg", photo(60, 80), {}),
        "large": ("b.jpg", photo(90, 120), {}),  # reduced to max_image_side on the device
        "grey": ("c.jpg", photo(64, 64).convert("L"), {}),
        "png": ("d.png", photo(50, 70), {}),
        "cmyk": ("e.jpg", photo(64, 48).convert("CMYK"), {}),
    }
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF: rotate 90 degrees on display
    files["rotated"] = ("f.jpg", photo(48, 64), {"exif": rotated.tobytes()})
    paths = {}
    for key, (name, image, options) in files.items():
        image.save(folder / name, quality=90, **options)
        paths[key] = folder / name
    return paths


def test_jpegs_decoded_on_the_device_give_the_batches_of_worker_decoding(tmp_path):
    from opendino.data.device_decode import decode_batch, jpeg_header
    from opendino.data.sources import FolderSource

    paths = _photo_folder(tmp_path / "photos")
    taken = {k for k, p in paths.items() if jpeg_header(p.read_bytes()) is not None}
    assert taken == {"plain", "large", "grey"}  # PNG, CMYK and EXIF-rotated JPEGs stay with the workers
    source = FolderSource(tmp_path / "photos")
    cfg = CropConfig(global_size=32, local_size=16, n_local=2)
    kwargs = dict(batch_size=6, seed=3, photometric_in_worker=False, crops_on_device=True, max_image_side=100)
    workers = next(iter(build_ssl_loader(source, [cfg], **kwargs)))
    device = next(iter(build_ssl_loader(source, [cfg], decode_on_device=True, **kwargs)))
    assert "images" not in device and sum(j is not None for j in device["jpegs"]) == 3
    assert sum(d is not None for d in device["decoded"]) == 3
    for key in ("boxes", "collated_masks", "mask_indices_list", "labels"):
        assert torch.equal(device[key], workers[key]), key
    images, skipped = decode_batch(device["jpegs"], device["decoded"], device["names"], 100, torch.device("cpu"))
    assert skipped == [] and max(max(i.shape[-2:]) for i in images) == 100
    # the same decoder (libjpeg-turbo) and the same reduction: the same pixels, hence the same crops
    assert torch.equal(pad_stack(images), workers["images"])


def test_a_jpeg_the_device_cannot_decode_is_replaced_and_named(tmp_path):
    from opendino.data.device_decode import decode_batch

    paths = _photo_folder(tmp_path / "photos")
    good = torch.frombuffer(bytearray(paths["plain"].read_bytes()), dtype=torch.uint8)
    broken = torch.frombuffer(bytearray(paths["plain"].read_bytes()[:200] + b"\x00" * 300), dtype=torch.uint8)
    images, skipped = decode_batch(
        [good, broken, None],
        [None, None, torch.zeros(3, 5, 5, dtype=torch.uint8)],
        ["good.jpg", "broken.jpg", "x.png"],
        1024,
        torch.device("cpu"),
    )
    assert skipped == ["broken.jpg"] and torch.equal(images[1], images[0]) and images[2].shape == (3, 5, 5)
    with pytest.raises(RuntimeError, match="no image of the batch could be decoded"):
        decode_batch([broken], [None], ["broken.jpg"], 1024, torch.device("cpu"))
    with pytest.raises(ValueError, match="decode_on_device needs data.crops_on_device"):
        build_ssl_loader(
            SyntheticSource(n=4, size=32),
            [CropConfig(32, 16, 2)],
            batch_size=2,
            photometric_in_worker=False,
            decode_on_device=True,
        )
