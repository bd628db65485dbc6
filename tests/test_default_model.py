"""The shipped default model: loads offline by name, is small, and predicts what its model card says it does.

CI does not train it (``cliplab train --preset shapes-tiny`` does, in about 25 minutes); these tests check the
shipped weights and that the evaluation harness reproduces the model card's figures exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.eval import evaluate
from cliplab.models.loading import PRETRAINED_DIR

NAME = "shapes-tiny"
DIR = PRETRAINED_DIR / NAME


@pytest.fixture(scope="module")
def model():
    assert NAME in cliplab.list_pretrained(), "the default model must ship with the package"
    return cliplab.load(NAME)


def test_shipped_files_and_size():
    weights = DIR / "model.safetensors"
    assert weights.stat().st_size <= 20_000_000
    card = (DIR / "MODEL_CARD.md").read_text()
    for needle in ("## Recipe", "## Quality", "## Weaknesses", "Winoground", "truncated at 77", "seed"):
        assert needle in card


def test_zero_shot_colour_on_fresh_scenes(model):
    # single-object scenes from a world seed neither training (0) nor the card (1) used. Shape is a known weakness of
    # the shipped recipe (see the model card), so only colour is held to a high bar here.
    r = evaluate("zeroshot", model, "synthetic-zeroshot", dataset_options={"kind": "colour", "n_per_class": 10,
                                                                          "seed": 7}, cache_dir=None)
    assert r["metrics"]["top1"] >= 0.9, r["metrics"]["top1"]


def test_captions_find_their_scene(model):
    world = SceneWorld(image_size=64, seed=7)
    scenes = [world.sample(i) for i in range(50)]
    with torch.no_grad():
        img = model.encode_images([s.render() for s in scenes], normalize=True)
        txt = model.encode_texts([s.short_caption for s in scenes], normalize=True)
    ranks = (txt @ img.T > (txt * img).sum(-1, keepdim=True)).sum(-1)
    assert (ranks < 5).float().mean() >= 0.6  # chance: 10%


def test_harness_reproduces_model_card_figures(model):
    quality = json.loads((DIR / "quality.json").read_text())
    for kind in ("colour", "shape"):
        r = evaluate("zeroshot", model, "synthetic-zeroshot",
                     dataset_options={"kind": kind, "n_per_class": 50, "seed": quality["held_out_seed"]},
                     cache_dir=None, batch_size=256)
        assert round(r["metrics"]["top1"], 4) == quality["zeroshot"][kind]["top1"], kind
    assert model.config.same_architecture(cliplab.get_config(NAME))  # the registered name builds the shipped net
