"""Text tasks of `opendino eval` (zeroshot, retrieval, ovseg) and the recipe's `text_metrics`: each metric
against a direct computation or a hand-made case, then `opendino eval` end to end on a tiny text run."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from opendino.cli import main
from opendino.eval.text import (
    BACKGROUND_PROMPTS,
    background_weight,
    chance_levels,
    ovseg_miou,
    random_text_like,
    resolve_classnames,
    resolve_templates,
    retrieval_ranks,
    retrieval_recall,
    text_metrics,
    zero_shot_accuracy,
    zero_shot_weights,
)
from opendino.models import build_model, save_model
from opendino.models.text import TextAlignedModel, TextTransformer, VisionHead, save_text_model

RESOLUTION = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _text_model() -> TextAlignedModel:
    torch.manual_seed(0)
    backbone = build_model("vits16", embed_dim=48, num_heads=2, depth=2)
    head = VisionHead(48, num_heads=2, blocks=1)  # embed_dim 96: the image and patch halves of 48
    text = TextTransformer(width=32, layers=1, heads=2, embed_dim=96, context_length=32)
    return TextAlignedModel(backbone, head, text).eval()


def _text_run(tmp_path, with_text: bool = True):
    """A run folder as the text recipe leaves it: teacher, text parts, and the crops of its config."""
    model = _text_model()
    run = tmp_path / "run"
    save_model(model.backbone, run / "teacher.safetensors")
    if with_text:
        save_text_model(model, run / "text.safetensors")
    config = {"crops": {"global_size": RESOLUTION, "mean": list(MEAN), "std": list(STD)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, model


class _FakeText:
    """encode_text of deterministic random unit vectors per string, recording what it was given."""

    def __init__(self, dim: int = 8) -> None:
        self.dim, self.seen = dim, []

    def encode_text(self, texts):
        self.seen += list(texts)
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


# -- metrics ---------------------------------------------------------------------------------------------
def test_zero_shot_weights_are_the_renormalised_template_mean_and_accuracy_is_top_k():
    fake = _FakeText()
    classes, templates = ["red ring", "big square", "star"], ["a {}", "a photo of a {}.", "{}"]
    weights = zero_shot_weights(fake, classes, templates, batch=2)  # batches split across classes
    for c, name in enumerate(classes):
        prompts = torch.cat([fake.encode_text([t.format(name)]) for t in templates])
        expected = prompts.mean(0) / prompts.mean(0).norm()
        torch.testing.assert_close(weights[c], expected)
    assert fake.seen[:3] == ["a red ring", "a photo of a red ring.", "red ring"]
    background = fake.encode_text(list(BACKGROUND_PROMPTS)).mean(0)  # ovseg's row 0
    torch.testing.assert_close(background_weight(fake)[0], background / background.norm())
    # images equal to a class row are classified as it; top-5 of 3 classes is always a hit
    images = weights[[2, 0, 1, 1]]
    labels = torch.tensor([2, 0, 1, 0])
    result = zero_shot_accuracy(images, labels, weights)
    assert result == {"top1": 0.75, "top5": 1.0}
    assert chance_levels(n_classes=3) == {"chance_top1": 1 / 3, "chance_top5": 1.0}
    assert chance_levels(n_classes=10)["chance_top5"] == 0.5 and chance_levels(n_pairs=20)["chance_r10"] == 0.5


def test_retrieval_ranks_break_ties_towards_the_lower_index():
    scores = torch.tensor(
        [
            [1.0, 1.0, 0.0],  # the tie is at a higher index: rank 0
            [0.5, 0.2, 0.5],  # two candidates above: rank 2
            [0.3, 0.3, 0.3],  # two equal candidates at lower indices: rank 2
        ]
    )
    assert retrieval_ranks(scores).tolist() == [0, 2, 2]
    assert retrieval_ranks(scores[1:], offset=1).tolist() == [2, 2]  # a chunk of rows keeps its pairs
    # identical texts tie everywhere: the first of them wins for both queries
    images = torch.eye(6)
    texts = images.clone()
    texts[3] = texts[2]  # image 3 scores 0 with every text: its pair ranks behind texts 0, 1, 2
    assert retrieval_ranks(images @ texts.T).tolist() == [0, 0, 0, 3, 0, 0]
    assert retrieval_ranks(texts @ images.T).tolist() == [0, 0, 0, 3, 0, 0]  # image 2 above, 0 and 1 tie lower
    result = retrieval_recall(images, texts, ks=(1, 5))
    assert math.isclose(result["image_to_text_r1"], 5 / 6) and math.isclose(result["text_to_image_r1"], 5 / 6)
    assert result["image_to_text_r5"] == result["text_to_image_r5"] == 1.0
    # chunked scoring equals the whole matrix
    g = torch.Generator().manual_seed(1)
    a, b = F.normalize(torch.randn(50, 8, generator=g), dim=-1), F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    whole = retrieval_recall(a, b, chunk=4096)
    assert retrieval_recall(a, b, chunk=7) == whole
    ranks = retrieval_ranks(a @ b.T)
    assert whole["image_to_text_r10"] == (ranks < 10).sum().item() / 50


def test_open_vocabulary_segmentation_of_a_known_case():
    model = _text_model()
    # Classifier rows whose patch halves (the last 48 of 96) are unit axes 0, 1, 2; patches along them.
    weights = torch.zeros(3, 96)
    weights[torch.arange(3), 48 + torch.arange(3)] = 1.0
    weights[:, :48] = torch.randn(3, 48)  # the image half plays no part
    axes = torch.eye(48)
    patches = torch.stack([torch.stack([axes[0], axes[1]]), torch.stack([axes[2], axes[1]])])[None]  # [1, 2, 2, 48]
    truth = torch.tensor([[0, 1], [2, 1]]).repeat_interleave(4, 0).repeat_interleave(4, 1)[None]  # 8x8 pixels
    assert ovseg_miou(model, patches, weights, truth.to(torch.uint8))["miou"] == 1.0
    wrong = truth.clone()
    wrong[:, 4:, :4] = 1  # the class-2 quadrant labelled 1: IoU class 1 = 32/48, class 2 = 0/16
    wrong[:, 0, 0] = 255  # ignored
    result = ovseg_miou(model, patches, weights, wrong.to(torch.uint8))
    assert math.isclose(result["miou"], (15 / 15 + 32 / 48 + 0) / 3, rel_tol=1e-6)


def test_text_metrics_match_direct_computations_and_restore_modes():
    model = _text_model()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, RESOLUTION, RESOLUTION, generator=g)
    labels = torch.arange(12) % 3
    captions = [f"a {'red green blue'.split()[i % 3]} shape number {i}" for i in range(12)]
    classnames, templates = ["red_shape", "green shape", "Blue Shape"], ("a {}", "a photo of a {}")
    model.train()
    model.backbone.eval()  # a locked backbone stays in eval mode during training
    result = text_metrics(model, images, labels, captions, classnames, templates, batch_size=5)
    assert model.head.training and model.text.training and not model.backbone.training
    assert set(result) == {"zeroshot_top1", "zeroshot_top5", "retrieval_i2t_r1", "retrieval_t2i_r1"}
    model.eval()
    embedded = model.encode_image(images)
    weights = zero_shot_weights(model, ["red shape", "green shape", "Blue Shape"], templates)
    top = zero_shot_accuracy(embedded, labels, weights)
    recall = retrieval_recall(embedded, model.encode_text(captions), ks=(1,))
    assert math.isclose(result["zeroshot_top1"], top["top1"]) and math.isclose(result["zeroshot_top5"], top["top5"])
    assert math.isclose(result["retrieval_i2t_r1"], recall["image_to_text_r1"])
    assert math.isclose(result["retrieval_t2i_r1"], recall["text_to_image_r1"])
    with pytest.raises(ValueError, match="one each"):
        text_metrics(model, images, labels, captions[:-1], classnames, templates)


def test_random_text_twin_shares_the_backbone_and_reinitialises_head_and_text():
    model = _text_model()
    with torch.no_grad():
        for p in [*model.head.parameters(), *model.text.parameters()]:
            p.add_(0.1)  # "trained"
    state = torch.random.get_rng_state()
    twin = random_text_like(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert twin.backbone is model.backbone
    assert not torch.equal(twin.text.token_embedding.weight, model.text.token_embedding.weight)
    again = random_text_like(model)
    assert torch.equal(again.text.token_embedding.weight, twin.text.token_embedding.weight)  # seeded


def test_templates_and_classnames_inputs(tmp_path):
    assert resolve_templates(None, synthetic=True)[0] == "synthetic"
    assert resolve_templates(None, synthetic=False)[0] == "simple"
    file = tmp_path / "templates.txt"
    file.write_text("a photo of {}\n\nart of the {}\n")
    assert resolve_templates(str(file), synthetic=True) == (str(file), ("a photo of {}", "art of the {}"))
    file.write_text("a photo\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        resolve_templates(str(file), synthetic=True)
    with pytest.raises(ValueError, match="neither a built-in set"):
        resolve_templates("fancy", synthetic=True)
    names = tmp_path / "names.txt"
    names.write_text("Red  Ring\nsmall_cube\n")
    assert resolve_classnames(["a", "b"], names) == ["Red  Ring", "small cube"]
    with pytest.raises(ValueError, match="2 names for 3 class folders"):
        resolve_classnames(["a", "b", "c"], names)


# -- `opendino eval` end to end ---------------------------------------------------------------------------
def test_eval_text_tasks_on_synthetic_data_for_trained_and_random_init(tmp_path, capsys):
    run, _ = _text_run(tmp_path)
    out = tmp_path / "report"
    args = ["eval", str(run), "--out", str(out), "--n-train", "20", "--n-val", "20", "--batch-size", "8"]
    assert main([*args, "--tasks", "knn,zeroshot,retrieval,ovseg"]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("trained", "random_init"):
        assert set(results[name]) == {"knn", "zeroshot", "retrieval", "ovseg"}
        zs, ret, seg = results[name]["zeroshot"], results[name]["retrieval"], results[name]["ovseg"]
        n = zs["n_classes"]
        assert n == len(results["meta"]["classes"]) and zs["templates"] == "synthetic"
        assert 0 <= zs["top1"] <= zs["top5"] <= 1
        assert zs["chance_top1"] == 1 / n and zs["chance_top5"] == min(5, n) / n
        assert ret["n_pairs"] == 20 and ret["chance_r1"] == 1 / 20 and ret["chance_r10"] == 0.5
        assert all(0 <= ret[f"{d}_r{k}"] <= 1 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
        assert 0 <= seg["miou"] <= 1 and seg["n_classes"] == 11  # background + the 10 synthetic classes
    text = results["meta"]["text"]
    assert text["ovseg_classes"][:3] == ["background", "circle", "square"]  # the synthetic world's ids
    assert text["classnames"] == results["meta"]["classes"]  # sorted folder names, no underscores here
    assert results["meta"]["resolution"] == RESOLUTION  # from the run's config
    report = (out / "report.md").read_text()
    assert report.count("| zeroshot |") == 2 and report.count("| retrieval |") == 6 and "| ovseg | miou |" in report
    assert "| zeroshot | top1 |" in report and "freshly initialised vision head and text tower" in report
    assert "zeroshot" in capsys.readouterr().out


def test_zero_shot_class_texts_keep_capitals_and_spaces(tmp_path, monkeypatch):
    from opendino.eval.suite import evaluate

    run, _ = _text_run(tmp_path)
    data = tmp_path / "data"
    for split in ("train", "val"):
        for k, name in enumerate(("Red Ring", "big_Square")):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (200 * k, 40 * i, 90)).save(folder / f"{i}.png")
                if split == "val" and i < 2:
                    (folder / f"{i}.txt").write_text(f"picture {k} {i}\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\n")  # the prompts are the class texts themselves
    seen = []
    encode = TextAlignedModel.encode_text

    def spy(self, texts):
        seen.extend(texts)
        return encode(self, texts)

    monkeypatch.setattr(TextAlignedModel, "encode_text", spy)
    results = evaluate(
        run,
        data=str(data),
        tasks=("zeroshot", "retrieval", "ovseg"),
        out=tmp_path / "r",
        templates=str(templates),
        progress=False,
        log=lambda _: None,
    )
    assert {"Red Ring", "big Square"} <= set(seen) and "big_Square" not in seen
    assert results["meta"]["text"]["classnames"] == ["Red Ring", "big Square"]
    assert results["trained"]["zeroshot"]["templates"] == str(templates)
    assert results["trained"]["retrieval"]["n_pairs"] == 4  # only the captioned val images
    assert "skipped" in results["trained"]["ovseg"] and "skipped" in results["random_init"]["ovseg"]
    names = tmp_path / "names.txt"
    names.write_text("a ring\n")
    with pytest.raises(ValueError, match="1 names for 2 class folders"):
        evaluate(run, data=str(data), tasks=("zeroshot",), out=tmp_path / "r2", classnames=names, log=lambda _: None)


def test_text_tasks_on_a_model_without_a_text_tower_fail_first_and_write_nothing(tmp_path, capsys):
    run, _ = _text_run(tmp_path, with_text=False)
    out = tmp_path / "report"
    assert main(["eval", str(run), "--tasks", "knn,zeroshot", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--tasks zeroshot need a text-aligned model" in err and "text.safetensors" in err
    assert "opendino train configs/text/demo.yaml" in err
    assert not out.exists()
    # a registered backbone: refused before its weights are looked for
    assert main(["eval", "vits16", "--tasks", "ovseg,retrieval", "--out", str(out)]) == 1
    assert "registered backbone has no text tower" in capsys.readouterr().err and not out.exists()
