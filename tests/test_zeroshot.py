"""Zero-shot classifiers: ensembling is the normalised mean of normalised prompt embeddings, descriptions combine as
documented, prompts are de-duplicated and batched without changing results, and template files (ours and CLIP's
official ones) parse safely."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.data import zero_shot_task
from cliplab.zeroshot import (
    ZeroShotClassifier,
    class_prompt_groups,
    encode_prompts,
    fill_template,
    list_prompts_md_datasets,
    list_template_sets,
    load_descriptions,
    load_prompt_set,
    load_templates,
    read_prompts_md,
)
from conftest import shared_path

DIM = 16


@pytest.fixture(scope="module")
def tiny():
    return cliplab.create_model("test-tiny", seed=0).eval()


def fake_vec(text: str) -> torch.Tensor:
    """A deterministic, unnormalised 'embedding' per string (different norms, so normalisation matters)."""
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(DIM, generator=g) * (1 + zlib.crc32(text.encode()) % 7)


class CountingEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.stack([fake_vec(t) for t in texts])


def ensemble(prompts: list[str]) -> torch.Tensor:
    """The reference: normalise each prompt embedding, average, re-normalise."""
    return F.normalize(torch.stack([F.normalize(fake_vec(p), dim=0) for p in prompts]).mean(0), dim=0)


# --- building --------------------------------------------------------------------------------------------------------
def test_ensemble_weights_match_hand_computed_with_the_real_model(tiny):
    classes, templates = ["cat", "dog", "sea otter"], ["a photo of a {}.", "a blurry photo of the {}.", "{}"]
    clf = ZeroShotClassifier.from_classnames(tiny, classes, templates, batch_size=2)
    assert clf.weights.shape == (3, tiny.config.embed_dim)
    with torch.no_grad():
        for c, name in enumerate(classes):
            # each prompt encoded alone: batching, length sorting and de-duplication must not change anything
            rows = [F.normalize(tiny.encode_text(tiny.tokenize([t.format(name)]))[0], dim=0) for t in templates]
            expected = F.normalize(torch.stack(rows).mean(0), dim=0)
            torch.testing.assert_close(clf.weights[c], expected, atol=2e-6, rtol=0)
    assert torch.allclose(clf.weights.norm(dim=-1), torch.ones(3))


def test_encode_prompts_keeps_input_order_across_length_sorted_batches(tiny):
    texts = ["a", "a much longer prompt about a dog on a red couch", "b c", "x" * 3, "one two three four five"]
    calls = []
    out = encode_prompts(tiny, texts, batch_size=2, on_batch=lambda idx, f: calls.append(idx))
    torch.testing.assert_close(out, tiny.encode_texts(texts, batch_size=1), atol=2e-6, rtol=0)
    assert sorted(i for c in calls for i in c) == list(range(5)) and all(len(c) <= 2 for c in calls)


def test_prompts_are_deduplicated_and_encoded_in_one_pass():
    enc = CountingEncoder()
    templates = ["a photo of a {}.", "a photo of a {}.", "art of the {c}"]
    clf = ZeroShotClassifier.from_classnames(None, ["cat", "dog"], templates, text_encoder=enc)
    assert len(enc.calls) == 1
    assert sorted(enc.calls[0]) == sorted(["a photo of a cat.", "art of the cat", "a photo of a dog.", "art of the dog"])
    # a duplicated template counts twice in the average (it is in the list twice), but is encoded once
    expected = F.normalize(2 * F.normalize(fake_vec("a photo of a cat."), dim=0)
                           + F.normalize(fake_vec("art of the cat"), dim=0), dim=0)
    torch.testing.assert_close(clf.weights[0], expected, atol=1e-6, rtol=0)
    assert clf.logit_scale == 100.0 and clf.classnames == ["cat", "dog"]


def test_synonyms_pool_all_names_and_templates():
    enc = CountingEncoder()
    clf = ZeroShotClassifier.from_classnames(None, [["happy", "smiling"], "sad"], ["a {} face", "they look {}"],
                                             text_encoder=enc)
    torch.testing.assert_close(
        clf.weights[0], ensemble(["a happy face", "they look happy", "a smiling face", "they look smiling"]),
        atol=1e-6, rtol=0)
    assert clf.classnames == ["happy", "sad"]


@pytest.mark.parametrize("mode", ["pool", "balanced", "only"])
def test_descriptions_combine_as_documented(mode):
    descs = {"circle": ["no corners", "a round outline"]}  # "square" has none: templates only, in every mode
    clf = ZeroShotClassifier.from_classnames(None, ["circle", "square"], ["a {}", "an image of a {}"], descs,
                                             description_mode=mode, text_encoder=CountingEncoder())
    t = ["a circle", "an image of a circle"]
    d = ["a photo of a circle, which has no corners.", "a photo of a circle, which has a round outline."]
    if mode == "pool":
        expected = ensemble(t + d)
    elif mode == "balanced":
        expected = F.normalize((ensemble(t) + ensemble(d)) / 2, dim=0)
    else:
        expected = ensemble(d)
    torch.testing.assert_close(clf.weights[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(clf.weights[1], ensemble(["a square", "an image of a square"]), atol=1e-6, rtol=0)


def test_descriptions_as_per_class_lists_and_custom_template():
    groups = class_prompt_groups(["cat", "dog"], ["a {}"], [["whiskers"], None], description_template="{c} with {d}")
    assert groups == [[["a cat", "cat with whiskers"]], [["a dog"]]]
    with pytest.raises(ValueError, match="description_mode"):
        class_prompt_groups(["cat"], ["a {}"], None, description_mode="mean")
    with pytest.raises(ValueError, match="2 classes"):
        class_prompt_groups(["cat", "dog"], ["a {}"], [["x"]])


# --- predicting ------------------------------------------------------------------------------------------------------
def test_predict_on_an_oracle_picks_the_class_whose_weight_the_image_feature_is():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, DIM, generator=g)
    clf = ZeroShotClassifier(w, [f"c{i}" for i in range(7)], logit_scale=50.0)
    feats = torch.cat([w * 3.0, -w[:1]])  # any positive scale; the last one is anti-aligned with class 0
    logits = clf.predict(feats)
    assert logits.shape == (8, 7)
    assert logits[:7].argmax(1).tolist() == list(range(7))
    torch.testing.assert_close(logits[:7].diagonal(), torch.full((7,), 50.0))
    assert logits[7].argmin() == 0


def test_classify_returns_topk_names_with_probabilities(tiny):
    task = zero_shot_task("colour", 1, image_size=64, seed=0)
    with torch.no_grad():
        weights = tiny.encode_images(task.images)  # oracle weights: each image's own feature
    clf = ZeroShotClassifier(weights, task.classnames, logit_scale=100.0, model=tiny)
    out = clf.classify(task.images, topk=3)
    assert [row[0][0] for row in out] == task.classnames
    for row in out:
        probs = [p for _, p in row]
        assert len(row) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    pixels = tiny.preprocessor.batch(task.images[:2])
    assert [r[0][0] for r in clf.classify(pixels, topk=1)] == task.classnames[:2]


def test_save_and_load_round_trip(tmp_path):
    clf = ZeroShotClassifier(torch.randn(3, DIM), ["a", "b", "c"], logit_scale=42.0)
    back = ZeroShotClassifier.load(clf.save(tmp_path / "clf.safetensors"))
    assert torch.equal(back.weights, clf.weights) and back.classnames == ["a", "b", "c"] and back.logit_scale == 42.0


# --- templates as data -----------------------------------------------------------------------------------------------
def test_shipped_template_sets_load_and_have_placeholders():
    assert {"generic", "single", "synthetic"} <= set(list_template_sets())
    for name in list_template_sets():
        templates = load_templates(name)
        assert templates and all("{}" in t or "{c}" in t for t in templates)
    assert load_templates("single") == ["a photo of a {}."]
    descs = load_descriptions("synthetic-descriptions")
    assert set(descs) == {"circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"}


def test_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("# comment\n\na {} here\n  the {c} there  \n")
    assert load_templates(tmp_path / "t.txt") == ["a {} here", "the {c} there"]
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["x {}"], "classes": ["a", ["b", "bee"]]}))
    ps = load_prompt_set(str(tmp_path / "t.json"))
    assert ps.templates == ["x {}"] and ps.classnames == ["a", "b"]
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError):
        load_templates("no-such-set")
    assert fill_template("{c} {d} {other} {}", "cat", "fur") == "cat fur {other} cat"


def test_prompts_md_is_parsed_without_executing_code(tmp_path):
    marker = tmp_path / "pwned"
    md = tmp_path / "prompts.md"
    md.write_text(
        "# Prompts\n\n## Good-Set\n\n```bash\nclasses = [\n    'a',\n    ['b', 'c'],\n]\n\n"
        "templates = [\n    'a photo of a {}.',\n]\n```\n\n"
        f"## Evil\n\n```bash\nclasses = [__import__('os').system('touch {marker}')]\ntemplates = ['{{}}']\n```\n")
    ps = read_prompts_md(md, "good set")
    assert ps.classes == ["a", ["b", "c"]] and ps.templates == ["a photo of a {}."] and ps.dataset == "Good-Set"
    with pytest.raises(ValueError, match="not a literal"):
        read_prompts_md(md, "Evil")
    assert not marker.exists()
    with pytest.raises(KeyError, match="Good-Set"):
        read_prompts_md(md, "missing")
    with pytest.raises(ValueError, match="section"):
        load_prompt_set(str(md))


def test_clip_prompts_md_cifar10_and_fer2013():
    md = shared_path("clip-prompts", "prompts.md")
    ps = load_prompt_set(f"{md}#CIFAR-10")
    assert ps.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(ps.templates) == 18 and ps.templates[0] == "a photo of a {}."
    assert len(load_prompt_set(f"{md}#cifar100").classes) == 100
    fer = read_prompts_md(md, "FacialEmotionRecognition2013")
    assert ["happy", "smiling"] in fer.classes and len(fer.classes) == 7
    assert len(list_prompts_md_datasets(md)) == 26


def test_clip_imagenet_json():
    ps = load_prompt_set(shared_path("clip-prompts", "imagenet_classes_templates.json"))
    assert len(ps.classes) == 1000 and len(ps.templates) == 80


# --- warnings and progress -------------------------------------------------------------------------------------------
def test_duplicate_class_names_warn_with_their_indices():
    enc = CountingEncoder()
    with pytest.warns(UserWarning, match=r"duplicate class names: 'cat' \(0, 2\)"):
        clf = ZeroShotClassifier.from_classnames(None, ["cat", "dog", "Cat."], ["a {}"], text_encoder=enc)
    assert clf.num_classes == 3
    with pytest.warns(UserWarning, match=r"'b' \(1, 2\)"):  # synonyms: the display name (first synonym) counts
        ZeroShotClassifier.from_classnames(None, ["a", ["b", "bee"], ["b", "bb"]], ["a {}"], text_encoder=enc)


def test_encode_prompts_reports_plain_progress_lines_off_a_terminal(tiny, capsys, monkeypatch):
    import cliplab.progress

    monkeypatch.setattr(cliplab.progress, "LINE_EVERY", 0.0)
    encode_prompts(tiny, ["a cat", "a dog", "a fox"], batch_size=2, progress=None, desc="prompts")
    err = capsys.readouterr().err
    assert "prompts: 3/3 items" in err and "\r" not in err
    encode_prompts(tiny, ["a cat"], progress=False, desc="prompts")
    assert capsys.readouterr().err == ""


def test_clip_imagenet_list_has_the_two_known_duplicates():
    from cliplab.zeroshot import duplicate_classnames

    pset = load_prompt_set(str(shared_path("clip-prompts", "imagenet_classes_templates.json")))
    assert duplicate_classnames(pset.classes) == {"missile": [657, 744], "sunglasses": [836, 837]}
