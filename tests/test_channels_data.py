"""Images with any number of channels: .npy / .npz / multi-channel TIFF / 16-bit PNG decoding, the channel
check of sources, and `opendino data stats`."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from opendino.cli import main
from opendino.data.mix import write_manifest
from opendino.data.sources import (
    ChannelMismatchError,
    FolderSource,
    TarShardSource,
    decode_image,
    open_source,
    to_uint8,
)
from opendino.data.stats import sample_indices


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def _levels(a: np.ndarray, top: float) -> np.ndarray:
    """The decode's value rule, written out: value / top in [0, 1], to the nearest 8-bit level."""
    return np.clip(np.floor(a.astype(np.float64) / top * 255 + 0.5), 0, 255).astype(np.uint8)


@pytest.fixture()
def four() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)


# --- decoding -------------------------------------------------------------------------------------------


def test_multichannel_tiff(tmp_path, four):
    contig = tmp_path / "contig.tif"
    tifffile.imwrite(contig, four, photometric="minisblack", planarconfig="contig")
    with pytest.raises(OSError):  # PIL cannot read it: tifffile does
        Image.open(contig)
    out = decode_image(contig, channels=4)
    assert out.dtype == torch.uint8 and out.shape == (4, 20, 30) and out.is_contiguous()
    assert np.array_equal(_hwc(out), four)

    wide = (four.astype(np.uint16) * 257).transpose(2, 0, 1)  # 16-bit, planar: (C, H, W)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, wide, photometric="minisblack", planarconfig="separate")
    assert np.array_equal(_hwc(decode_image(planar, channels=4)), four)  # x * 257 / 65535 * 255 = x


def test_rgb_tiff_is_read_by_pil_as_before(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(_hwc(decode_image(path)), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_npy_layouts(tmp_path, four, layout):
    path = tmp_path / "a.npy"
    np.save(path, four if layout == "hwc" else np.ascontiguousarray(four.transpose(2, 0, 1)))
    out = decode_image(path, channels=4)
    assert out.shape == (4, 20, 30) and np.array_equal(_hwc(out), four)
    assert np.array_equal(_hwc(decode_image(path.read_bytes(), channels=4)), four)  # bytes: told by magic


def test_npz_takes_image_else_first(tmp_path, four):
    named = tmp_path / "named.npz"
    np.savez(named, mask=np.zeros((20, 30)), image=four)
    assert np.array_equal(_hwc(decode_image(named, channels=4)), four)
    first = tmp_path / "first.npz"
    np.savez(first, four, np.zeros((20, 30)))
    assert np.array_equal(_hwc(decode_image(first, channels=4)), four)


def test_array_values_and_layout_rules(tmp_path):
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 65536, (16, 18), dtype=np.uint16)
    np.save(tmp_path / "wide.npy", wide)
    out = decode_image(tmp_path / "wide.npy", channels=1)
    assert out.shape == (1, 16, 18) and np.array_equal(out[0].numpy(), _levels(wide, 65535))
    small = rng.integers(0, 200, (16, 18), dtype=np.int32)  # max <= 255: values kept
    assert np.array_equal(to_uint8(small), small.astype(np.uint8))
    unit = rng.random((16, 18, 2)).astype(np.float32)  # float in [0, 1]: scaled by 255
    np.save(tmp_path / "unit.npy", unit)
    assert np.array_equal(_hwc(decode_image(tmp_path / "unit.npy", channels=2)), _levels(unit, 1.0))
    mask = rng.random((5, 16, 18)) > 0.5  # bool -> 0 / 255; last axis not the shortest: (C, H, W)
    np.save(tmp_path / "mask.npy", mask)
    assert np.array_equal(decode_image(tmp_path / "mask.npy", channels=5).numpy(), mask.astype(np.uint8) * 255)
    # One rule per image, not per channel: a dim channel stays dim beside a bright one.
    two = np.stack([np.full((4, 4), 200), np.full((4, 4), 65535)], axis=2).astype(np.uint16)
    assert to_uint8(two)[0, 0].tolist() == [1, 255]
    np.save(tmp_path / "two.npy", two)
    assert decode_image(tmp_path / "two.npy", channels=2)[:, 0, 0].tolist() == [1, 255]


def test_non_finite_values_are_zero_and_do_not_set_the_range():
    raster = np.full((4, 4), 0.5, np.float32)
    raster[0, 0], raster[1, 1] = np.nan, np.inf  # "no data" in a float raster
    out = to_uint8(raster)
    assert out[0, 0] == out[1, 1] == 0 and (np.delete(out.ravel(), [0, 5]) == 128).all()


def test_16bit_png_keeps_one_channel_and_the_shared_rule(tmp_path):
    wide = np.random.default_rng(3).integers(0, 65536, (12, 14), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(wide).save(path)
    one = decode_image(path, channels=1)
    assert one.shape == (1, 12, 14) and np.array_equal(one[0].numpy(), _levels(wide, 65535))
    rgb = decode_image(path)  # channels=3: RGB through the same value rule
    assert rgb.shape == (3, 12, 14) and torch.equal(rgb, one.expand(3, -1, -1))


def test_one_channel_becomes_rgb_and_other_mismatches_raise(tmp_path, four):
    grey = four[:, :, 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")  # a grey picture is shown in RGB ...
    assert torch.equal(decode_image(tmp_path / "grey.png"), torch.from_numpy(grey).expand(3, -1, -1))
    np.save(tmp_path / "grey.npy", grey)  # ... a 2-D array (a mask, a feature matrix) is not an RGB image
    with pytest.raises(ChannelMismatchError, match="1 channels, 3 requested"):
        decode_image(tmp_path / "grey.npy")
    assert torch.equal(decode_image(tmp_path / "grey.npy", channels=1)[0], torch.from_numpy(grey))
    np.save(tmp_path / "four.npy", four)
    with pytest.raises(ChannelMismatchError) as error:
        decode_image(tmp_path / "four.npy")
    message = str(error.value)
    assert "four.npy" in message and "4 channels" in message and "3 requested" in message
    assert "model.in_chans" in message
    Image.fromarray(four[:, :, :3]).save(tmp_path / "rgb.png")
    with pytest.raises(ChannelMismatchError, match="3 channels, 4 requested"):
        decode_image(tmp_path / "rgb.png", channels=4)
    with pytest.raises(ChannelMismatchError, match="1 channels, 2 requested"):
        decode_image(tmp_path / "grey.npy", channels=2)


def test_undecodable_and_pickled_arrays_are_none(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert decode_image(tmp_path / "objects.npy", channels=1) is None  # never unpickled
    for raw in (b"\x93NUMPY garbage", b"PK\x03\x04 garbage", b"II*\x00 garbage", b"MM\x00* garbage", b""):
        assert decode_image(raw, channels=4) is None
    np.save(tmp_path / "volume.npy", np.zeros((2, 3, 4, 5), dtype=np.uint8))  # 4 axes: not an image
    assert decode_image(tmp_path / "volume.npy", channels=5) is None


def test_large_arrays_are_reduced_like_pil(tmp_path):
    big = np.random.default_rng(4).integers(0, 256, (300, 500, 4), dtype=np.uint8)
    np.save(tmp_path / "big.npy", big)
    out = decode_image(tmp_path / "big.npy", max_side=64, channels=4)
    assert out.shape == (4, 38, 64)
    for c in range(4):
        plane = Image.fromarray(np.ascontiguousarray(big[:, :, c]))
        plane.thumbnail((64, 64), Image.Resampling.BICUBIC)
        assert np.array_equal(out[c].numpy(), np.asarray(plane))


# --- the 3-channel path is unchanged -------------------------------------------------------------------


def test_rgb_png_and_jpeg_unchanged(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "alpha.png")
    for name in ("a.png", "a.jpg", "alpha.png"):
        out = decode_image(tmp_path / name)
        assert out.shape == (3, 60, 90)
        assert np.array_equal(_hwc(out), np.asarray(Image.open(tmp_path / name).convert("RGB")))
    reduced = decode_image(tmp_path / "a.png", max_side=32)  # reduced as the RGB image: PIL's thumbnail
    expected = Image.open(tmp_path / "a.png").convert("RGB")
    expected.thumbnail((32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(_hwc(reduced), np.asarray(expected))


# --- sources --------------------------------------------------------------------------------------------


def test_folder_lists_arrays_but_not_flow_labels(tmp_path, four):
    np.save(tmp_path / "a.npy", four)
    np.savez(tmp_path / "b.npz", image=four)
    np.save(tmp_path / "a.flow.npy", np.zeros((20, 30, 2), dtype=np.float32))
    Image.fromarray(four[:, :, 0]).save(tmp_path / "a.seg.png")
    names = sorted(p.rsplit("/", 1)[-1] for p, _ in FolderSource(tmp_path).records)
    assert names == ["a.npy", "b.npz"]


def test_check_readable_raises_on_wrong_channels(tmp_path, four):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", four)
    source = open_source(tmp_path)
    assert source.channels == 3 and source.load(0) is None  # a stray file is skipped...
    with pytest.raises(ChannelMismatchError) as error:  # ...but a wrong setting fails at start
        source.check_readable()
    assert str(tmp_path) in str(error.value) and "4 channels, 3 requested" in str(error.value)
    source.set_channels(4)
    source.check_readable()
    assert np.array_equal(_hwc(source.load(2)), four)


def test_mix_propagates_channels(tmp_path, four):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "0.npy", four)
    mix = open_source(write_manifest(tmp_path / "mix.yaml", [("x", "x", 1), ("y", "y", 1)]))
    with pytest.raises(ChannelMismatchError, match="source 'x'"):
        mix.check_readable()
    mix.set_channels(4)
    assert [s.channels for s in mix.sources] == [4, 4]
    mix.check_readable()
    assert mix.load(1).shape == (4, 20, 30)


def test_tar_members_decode_from_bytes(tmp_path, four):
    buf = io.BytesIO()
    np.save(buf, four)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("k0.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    source = TarShardSource([shard])
    with pytest.raises(ChannelMismatchError, match="k0.npy"):
        source.check_readable()
    source.set_channels(4)
    assert np.array_equal(_hwc(source.load(0)), four)


# --- opendino data stats --------------------------------------------------------------------------------


def test_data_stats_exact(tmp_path, capsys):
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (4, h, w), dtype=np.uint8) for h, w in ((20, 30), (25, 17), (40, 41))]
    images[1][2] = 7  # a flat channel in one image: exact pooling, not a mean of per-image stds
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", image)
    out = tmp_path / "stats.json"
    assert main(["data", "stats", str(tmp_path), "--channels", "4", "--json", str(out)]) == 0
    stats = json.loads(out.read_text())
    pixels = np.concatenate([image.reshape(4, -1) for image in images], axis=1).astype(np.float64) / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), rtol=0, atol=1e-6)
    assert stats["min_level"] == [int(v) for v in (pixels.min(axis=1) * 255).round()]
    assert stats["max_level"] == [int(v) for v in (pixels.max(axis=1) * 255).round()]
    assert stats["images_read"] == 3 and stats["images_skipped"] == 0
    assert stats["height_range"] == [20, 40] and stats["width_range"] == [17, 41]
    printed = capsys.readouterr().out
    mean = ",".join(f"{v:.4f}" for v in pixels.mean(axis=1))
    assert f"crops.mean=[{mean}]" in printed and "model.in_chans=4" in printed


def test_data_stats_subset_skips_and_warns(tmp_path, capsys):
    rng = np.random.default_rng(7)
    for i in range(6):  # 12-bit data stored as 16-bit: levels 0-16 after the decode rule
        np.save(tmp_path / f"{i}.npy", rng.integers(0, 4096, (8, 9), dtype=np.uint16))
    np.save(tmp_path / "rgb.npy", np.zeros((8, 9, 3), dtype=np.uint8))  # another channel count: skipped
    out = tmp_path / "stats.json"
    assert main(["data", "stats", str(tmp_path), "--channels", "1", "--json", str(out)]) == 0
    stats = json.loads(out.read_text())
    assert stats["images_read"] == 6 and stats["images_skipped"] == 1 and stats["low_range"]
    assert "12-bit" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path), "--channels", "1", "--max-images", "3", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images_read"] + json.loads(out.read_text())["images_skipped"] == 3
    assert sample_indices(7, 3, 0) == sample_indices(7, 3, 0) == sorted(sample_indices(7, 3, 0))
    assert len(set(sample_indices(7, 3, 0))) == 3 and sample_indices(2, 3, 0) == [0, 1]


def test_data_stats_bad_input(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert main(["data", "stats", str(tmp_path)]) == 2  # empty folder
    np.save(tmp_path / "four.npy", np.zeros((8, 9, 4), dtype=np.uint8))
    assert main(["data", "stats", str(tmp_path)]) == 2  # no image with 3 channels
    err = capsys.readouterr().err
    assert "no such file" in err and "no images found" in err and "4 channels, 3 requested" in err


def test_a_four_band_tiff_is_never_read_as_rgb(tmp_path):
    bands = np.random.default_rng(5).integers(0, 60000, (4, 16, 16), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "pages.tif", bands, photometric="minisblack")  # a page per band
    tifffile.imwrite(tmp_path / "rgba.tif", (bands.transpose(1, 2, 0) // 257).astype(np.uint8))  # saved as RGBA
    for name in ("pages.tif", "rgba.tif"):
        with pytest.raises(ChannelMismatchError, match="4 channels, 3 requested"):
            decode_image(tmp_path / name)
        assert decode_image(tmp_path / name, channels=4).shape == (4, 16, 16)


def test_some_images_of_another_channel_count_are_announced(tmp_path, four):
    tifffile.imwrite(tmp_path / "a.tif", four)
    Image.fromarray(four[:, :, :3]).save(tmp_path / "b.png")
    source = open_source(tmp_path)
    source.set_channels(4)
    with pytest.warns(UserWarning, match="1 of the first 2 images have another channel count than 4"):
        source.check_readable()
