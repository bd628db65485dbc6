"""`cliplab scenetext render|candidates`: the scene-text world and FDP's candidates from the command line."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from cliplab.cli import main
from cliplab.scenetext import SceneTextWorld
from cliplab.scenetext.fdp import candidate_target, distracted_candidates


def test_render_writes_the_scenes_and_their_words(tmp_path):
    r = CliRunner().invoke(main, ["scenetext", "render", "--n", "3", "--cluttered", "--seed", "4", "--image-size",
                                  "64", "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["scenes"] == 3
    meta = json.loads((tmp_path / "scenes.json").read_text())
    assert meta["seed"] == 4 and meta["cluttered"] is True and len(meta["scenes"]) == 3
    world = SceneTextWorld(image_size=64, seed=4, cluttered=True)
    for i, rec in enumerate(meta["scenes"]):
        scene = world.sample(i)
        assert rec["words"] == list(scene.words) and rec["boxes"] == [list(b) for b in scene.boxes]
        assert Image.open(tmp_path / rec["image"]).tobytes() == scene.image.tobytes()


def test_candidates_are_fdps():
    from cliplab.scenetext import DICTIONARY

    r = CliRunner().invoke(main, ["scenetext", "candidates", "cat", "-k", "4", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    pairs = distracted_candidates("cat", DICTIONARY, k=4)
    assert [(x["candidate"], x["distance"]) for x in rows] == pairs and rows[0]["candidate"] == "cat"
    assert [x["target"] for x in rows] == [round(t, 4) for t in candidate_target([d for _, d in pairs]).tolist()]


def test_fdp_train_then_search(tmp_path):
    r = CliRunner().invoke(main, ["scenetext", "fdp-train", "--scenes", "8", "--steps", "2", "--gallery", "6",
                                  "--seed", "3", "-o", str(tmp_path / "fdp.pt"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["steps"] == 2 and d["gallery"] == 6 and 0 <= d["fdp_report"]["mAP"] <= 1
    assert set(d["plain_clip_report"]) == {"mAP", "confuser_outranks_true_rate"}
    world = SceneTextWorld(seed=3, cluttered=True)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"s{i}.png"))
        world.sample(i).image.save(paths[-1])
    r = CliRunner().invoke(main, ["scenetext", "search", *paths, "-q", "cat", "--fdp", str(tmp_path / "fdp.pt"),
                                  "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["rank"] for x in rows] == [1, 2] and rows[0]["score"] >= rows[1]["score"]
    assert {x["path"] for x in rows} <= set(paths)
    r = CliRunner().invoke(main, ["scenetext", "search", paths[0], "-q", "zebra", "--fdp", str(tmp_path / "fdp.pt")])
    assert r.exit_code == 2 and "not in this FDP's vocabulary" in r.output
