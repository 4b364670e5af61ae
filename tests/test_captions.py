"""Image–caption pairs: the CLIP tokenizer, the caption conventions of every source, what is skipped and
why, and the seeded, resumable pair loader (also through the data pipeline)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from opendino.data.augment import normalize
from opendino.data.captions import (
    EMPTY_CAPTION,
    NO_CAPTION,
    UNDECODABLE_CAPTION,
    PairCollate,
    PairDataset,
    as_captioned,
    build_pair_loader,
)
from opendino.data.config import CropsConfig, DataConfig
from opendino.data.loader import SampleRef
from opendino.data.pipeline import DataNeeds, DataPipeline, MaskSpec
from opendino.data.sources import FolderSource, ListSource, SyntheticSource, TarShardSource, decode_image, open_source
from opendino.data.synthetic import render_scene, write_image_folder
from opendino.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def _rgb(path: Path, seed: int, size=(24, 20)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _reasons(pairs) -> dict[str, str]:
    return {Path(p).name: reason for p, reason in pairs.skipped}


def test_tokenizer_round_trip_padding_and_truncation(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id) == (49408, 49406, 49407)
    tokens = tokenizer(["A  Large RED circle\n on a striped background", "x"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokenizer.decode(tokens) == ["a large red circle on a striped background", "x"]
    for row in tokens:
        end = row.tolist().index(tokenizer.eot_token_id)
        assert row[0] == tokenizer.sot_token_id and end > 1 and not row[end + 1 :].any()  # zero padding
    assert torch.equal(tokenizer("x"), tokens[1:])  # a single string is a batch of one
    words = ["red", "blue", "green", "circle", "square"] * 40  # 200 one-token words
    long = tokenizer(" ".join(words))[0]
    assert long[0] == tokenizer.sot_token_id and long[-1] == tokenizer.eot_token_id and long.ne(0).all()
    assert tokenizer.decode(long) == [" ".join(words[:75])]  # cut to 75, the end token kept last
    short = Tokenizer(context_length=8)(" ".join(words))
    assert short.shape == (1, 8) and short[0, -1] == tokenizer.eot_token_id


def test_the_tokenizer_does_not_import_all_of_open_clip():
    code = "import sys; from opendino.data.tokenizer import Tokenizer; Tokenizer(); print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"  # its tokenizer module alone: no models, timm or transformers


def test_synthetic_captions_come_from_the_scene_without_rendering():
    src = SyntheticSource(n=6, size=32, split="val", seed=2)
    pairs = as_captioned(src)
    assert len(pairs) == 6 and not pairs.skipped
    captions = [pairs.caption(i) for i in range(6)]
    assert src._last is None  # nothing rendered
    assert captions == [render_scene(i, 32, "val", 2).caption for i in range(6)]
    assert len(set(captions)) == 6


def test_folder_sidecars_and_what_is_skipped(tmp_path):
    root = write_image_folder(tmp_path, 8, size=32)
    src = open_source(root)
    assert isinstance(src, FolderSource)
    pairs = as_captioned(src)
    assert len(pairs) == 8 and pairs.summary() == "8 pairs; no image skipped"
    for i in range(8):  # the caption of the right scene for the right image
        assert pairs.caption(i) == render_scene(int(Path(pairs.path(i)).stem), 32).caption
    paths = [Path(src.path(i)) for i in range(8)]
    paths[0].with_suffix(".txt").unlink()
    paths[1].with_suffix(".txt").write_text(" \n\t\n")
    paths[2].with_suffix(".txt").write_bytes(b"a \xff\xfe circle\n")
    pairs = as_captioned(open_source(root))
    assert len(pairs) == 5 and {pairs.path(i) for i in range(5)} == {str(p) for p in paths[3:]}
    assert _reasons(pairs) == {
        paths[0].name: NO_CAPTION,
        paths[1].name: EMPTY_CAPTION,
        paths[2].name: UNDECODABLE_CAPTION,
    }
    assert pairs.summary().startswith(
        f"5 pairs; 3 images skipped: 1 without caption, 1 empty, 1 undecodable; first: {paths[0]} (no caption)"
    )
    for p in paths:
        p.with_suffix(".txt").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=f"{root}: no image has a usable caption.*tar shards"):
        as_captioned(open_source(root))


def test_csv_and_tsv_caption_columns(tmp_path):
    for i, name in enumerate("abcd"):
        _rgb(tmp_path / f"{name}.png", i)
    (tmp_path / "pairs.csv").write_text('path,label,caption\na.png,dog,"a dog, sitting"\nb.png,cat,\nc.png,cat,a cat\n')
    src = open_source(tmp_path / "pairs.csv")
    assert isinstance(src, ListSource) and src.classes == ["cat", "dog"]
    assert [src.label(i) for i in range(3)] == [1, 0, 0]  # the label column stays the label
    pairs = as_captioned(src)
    assert [(Path(pairs.path(i)).name, pairs.caption(i), pairs.label(i)) for i in range(2)] == [
        ("a.png", "a dog, sitting", 1),
        ("c.png", "a cat", 0),
    ]
    assert _reasons(pairs) == {"b.png": NO_CAPTION}  # an empty cell
    assert torch.equal(pairs.load(1), decode_image(tmp_path / "c.png"))
    (tmp_path / "text.csv").write_text("text,path\nfirst,b.png\n")  # any column order; "text" names it too
    pairs = as_captioned(open_source(tmp_path / "text.csv"))
    assert Path(pairs.path(0)).name == "b.png" and pairs.caption(0) == "first"

    tsv = b'path\tcaption\na.png\ta "quoted" dog\nb.png\t  \nc.png\t\xff cat\nd.png\n'
    (tmp_path / "pairs.tsv").write_bytes(tsv)
    src = open_source(tmp_path / "pairs.tsv")
    assert isinstance(src, ListSource) and len(src) == 4
    pairs = as_captioned(src)
    assert len(pairs) == 1 and Path(pairs.path(0)).name == "a.png" and pairs.caption(0) == 'a "quoted" dog'
    assert _reasons(pairs) == {"b.png": EMPTY_CAPTION, "c.png": UNDECODABLE_CAPTION, "d.png": NO_CAPTION}
    (tmp_path / "bare.tsv").write_text("d.png\ta bird\nb.png\tsome cat\n")  # no header: path<TAB>caption
    pairs = as_captioned(open_source(tmp_path / "bare.tsv", "list"))
    assert [(Path(pairs.path(i)).name, pairs.caption(i)) for i in range(2)] == [
        ("d.png", "a bird"),
        ("b.png", "some cat"),
    ]


def test_a_csv_without_caption_header_still_means_labels(tmp_path):
    for i, name in enumerate("ab"):
        _rgb(tmp_path / f"{name}.png", i)
    (tmp_path / "labels.csv").write_text("path,label\na.png,2\nb.png,5\n")
    src = open_source(tmp_path / "labels.csv")
    assert [src.label(i) for i in range(2)] == [2, 5] and src.captions is None
    with pytest.raises(ValueError, match="labels.csv: no image has a usable caption"):
        as_captioned(src)  # no sidecars either
    (tmp_path / "a.txt").write_text("an image with a sidecar\n")
    pairs = as_captioned(src)  # an uncaptioned list falls back to sidecars
    assert len(pairs) == 1 and pairs.caption(0) == "an image with a sidecar" and pairs.label(0) == 2
    (tmp_path / "named.csv").write_text("a.png,dog\nb.png,cat\n")
    src = open_source(tmp_path / "named.csv")
    assert src.classes == ["cat", "dog"] and [src.label(i) for i in range(2)] == [1, 0]


def test_tar_shard_text_members(tmp_path):
    members = {"s0": "a red circle", "s1": None, "s2": "   ", "s3": "a blue star\n"}
    images = {}
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, (key, text) in enumerate(members.items()):
            buf = io.BytesIO()
            Image.fromarray(np.full((12, 16, 3), 40 * i, dtype=np.uint8)).save(buf, "JPEG")
            images[key] = buf.getvalue()
            entries = [(f"{key}.jpg", images[key])] + ([(f"{key}.txt", text.encode())] if text is not None else [])
            entries.append((f"{key}.cls", str(i).encode()))
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    src = open_source(tmp_path / "shard-000.tar")
    assert isinstance(src, TarShardSource)
    pairs = as_captioned(src)
    assert [pairs.caption(i) for i in range(len(pairs))] == ["a red circle", "a blue star"]
    assert [pairs.label(i) for i in range(2)] == [0, 3]
    assert torch.equal(pairs.load(1), decode_image(images["s3"]))
    assert _reasons(pairs) == {"shard-000.tar:s1.jpg": NO_CAPTION, "shard-000.tar:s2.jpg": EMPTY_CAPTION}


def test_an_unreadable_image_is_replaced_and_reported(tmp_path):
    root = write_image_folder(tmp_path, 4, size=32)
    pairs = as_captioned(open_source(root))
    Path(pairs.path(1)).write_bytes(b"not an image")
    dataset = PairDataset(pairs, image_size=16)
    batch = PairCollate()([dataset[SampleRef(1, seed=7, crop_set=0)], dataset[SampleRef(3, seed=8, crop_set=0)]])
    assert batch["skipped"] == [pairs.path(1)]
    assert batch["indices"].tolist() == [2, 3]  # the next pair, its caption with it
    assert torch.equal(batch["tokens"][0], Tokenizer()(pairs.caption(2))[0])
    assert batch["images"].shape == (2, 3, 16, 16) and batch["images"].dtype == torch.uint8
    # Known unreadable (a feature cache's list): the same replacement without decoding anything.
    unread = PairDataset(pairs, image_size=None, skip=frozenset({1}))[SampleRef(1, seed=7, crop_set=0)]
    assert (unread["index"], unread["skipped"], "image" in unread) == (2, [pairs.path(1)], False)
    assert PairDataset(pairs, image_size=None)[SampleRef(1, seed=7, crop_set=0)]["index"] == 1  # not decoded


def test_pair_loader_is_seeded_resumable_and_can_skip_images(tokenizer):
    src = SyntheticSource(n=30, size=40)
    pairs = as_captioned(src)
    loader = iter(build_pair_loader(pairs, batch_size=4, seed=3, image_size=32))
    batches = [next(loader) for _ in range(3)]
    b = batches[0]
    assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.uint8
    assert b["tokens"].shape == (4, 77) and b["indices"].dtype == torch.long and b["skipped"] == []
    captions = [pairs.caption(i) for i in b["indices"].tolist()]
    assert torch.equal(b["tokens"], tokenizer(captions))
    assert b["labels"].tolist() == [render_scene(i, 40).label for i in b["indices"].tolist()]
    resumed = next(iter(build_pair_loader(pairs, batch_size=4, seed=3, image_size=32, start_step=2)))
    for key in ("images", "tokens", "indices", "labels"):
        assert torch.equal(resumed[key], batches[2][key])
    other = next(iter(build_pair_loader(pairs, batch_size=4, seed=4, image_size=32)))
    assert not torch.equal(other["indices"], b["indices"])
    no_images = next(iter(build_pair_loader(pairs, batch_size=4, seed=3, image_size=None)))
    assert "images" not in no_images
    assert torch.equal(no_images["tokens"], b["tokens"]) and torch.equal(no_images["indices"], b["indices"])
    # The whole image (scale 1, square) without flips: the crop is the resized image of its own index.
    whole = next(iter(build_pair_loader(pairs, batch_size=2, seed=3, image_size=24, scale=(1.0, 1.0), flips=False)))
    for image, index in zip(whole["images"], whole["indices"].tolist(), strict=True):
        expected = TF.resize(src.load(index), [24, 24], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(image, expected)


def test_the_pipeline_delivers_normalised_pairs():
    src = SyntheticSource(n=20, size=40)
    crops = CropsConfig(global_size=32, global_scale=(0.5, 1.0))
    pipeline = DataPipeline(DataConfig(), crops, DataNeeds(captions=True), batch_size=3, seed=1)
    pairs = pipeline.captioned(src)
    assert pipeline.captioned(src) is pairs  # indexed once: a recipe reads the same indices
    batch = next(pipeline.batches(src, 2))
    raw = next(iter(build_pair_loader(pairs, batch_size=3, seed=1, start_step=2, image_size=32, scale=(0.5, 1.0))))
    assert batch["image"].dtype == torch.float32 and "images" not in batch
    assert torch.allclose(batch["image"], normalize(raw["images"], crops.mean, crops.std))
    assert torch.equal(batch["tokens"], raw["tokens"]) and torch.equal(batch["indices"], raw["indices"])
    features_only = DataPipeline(DataConfig(), crops, DataNeeds(captions=True, images=False), batch_size=3, seed=1)
    batch = next(features_only.batches(src, 2))
    assert "image" not in batch and torch.equal(batch["indices"], raw["indices"])
    with pytest.raises(ValueError, match="without masks"):
        DataNeeds(captions=True, masks=MaskSpec(16))
