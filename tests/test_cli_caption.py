"""`cliplab caption train|images`: the CgT-GAN captioner from the command line, end to end with tiny settings."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cliplab.captioning import CaptionGenerator
from cliplab.cli import main


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    d = tmp_path_factory.mktemp("caption")
    r = CliRunner().invoke(main, ["caption", "train", "--images", "16", "--corpus", "40", "--init-steps", "3",
                                  "--steps", "2", "--test", "4", "--seed", "1", "-o", str(d / "gen.pt"), "--json"])
    assert r.exit_code == 0, r.output
    return d, json.loads(r.stdout)


def test_caption_train_reports_held_out_numbers(captioner):
    d, report = captioner
    assert report["steps"] == 2 and report["init_steps"] == 3 and report["test_images"] == 4
    assert 0 <= report["r1"] <= 1 and 0 <= report["parse_rate"] <= 1 and len(report["examples"]) == 3
    assert isinstance(CaptionGenerator.load(d / "gen.pt"), CaptionGenerator)


def test_caption_images_prints_a_caption_per_image(captioner, tmp_path):
    from cliplab.data.synthetic import SceneWorld

    d, _ = captioner
    world = SceneWorld(image_size=64, seed=3)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"s{i}.png"))
        world[i].image.save(paths[-1])
    r = CliRunner().invoke(main, ["caption", "images", *paths, "--generator", str(d / "gen.pt"), "--max-len", "3",
                                  "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["path"] for row in rows] == paths and all(1 <= len(row["caption"].split()) <= 3 for row in rows)
    r = CliRunner().invoke(main, ["caption", "images", paths[0], "--generator", str(d / "gen.pt")])
    assert r.exit_code == 0 and r.stdout.startswith(paths[0] + "\t")
    r = CliRunner().invoke(main, ["caption", "images", paths[0], "--generator", str(d / "gen.pt"), "-m", "test-tiny"])
    assert r.exit_code == 2 and "use the CLIP model the generator was trained with" in r.output
