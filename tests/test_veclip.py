"""VeCLIP (cliplab.curation.veclip): captioner, fusers, the data step, VeC-mixing and its effect."""

from __future__ import annotations

import json

import pytest

from cliplab.curation import veclip
from cliplab.curation.captioners import ColumnCaptioner, SceneGraphCaptioner, describe_objects
from cliplab.curation.pairs_io import read_output, rejects_path, write_pairs
from cliplab.curation.veclip import (ALT_COLUMNS, FUSED_COLUMNS, VEC_COLUMNS, ConceptFuser, IdentityFuser, LLMFuser, enrich,
                                     enrich_table, fusion_prompt, parse_fusion)

STEPS = 70  # per arm; experiments/curation_veclip.py runs 300 steps on a larger pool

GRAPH = [{"colour": "red", "shape": "circle", "size": "large"}, {"colour": "orange", "shape": "star", "size": "small"},
         {"colour": "blue", "shape": "ring", "size": "small"}]


# --- captioner ---------------------------------------------------------------------------------------------------------
def test_describe_objects():
    assert describe_objects(GRAPH[:1]) == "a red circle"
    assert describe_objects(GRAPH[:2]) == "a red circle and an orange star"
    assert describe_objects(GRAPH) == "a red circle, an orange star and a blue ring"


def test_scene_graph_captioner_omissions_and_keywords():
    row = {"image": "x.png", "objects": json.dumps(GRAPH)}
    assert SceneGraphCaptioner(drop_small=0.0)([row]) == ["a red circle, an orange star and a blue ring"]
    assert SceneGraphCaptioner(drop_small=1.0)([row]) == ["a red circle"]
    only_small = {"image": "y.png", "objects": json.dumps(GRAPH[1:])}
    assert SceneGraphCaptioner(drop_small=1.0)([only_small]) == ["an orange star"]   # never empty
    cap = SceneGraphCaptioner(drop_small=0.5, seed=0)
    assert cap([row]) == cap([row])                                                   # deterministic per row
    outs = {SceneGraphCaptioner(drop_small=0.5, seed=s)([row])[0] for s in range(20)}
    assert len(outs) > 1                                                              # seed reaches the draws
    assert SceneGraphCaptioner(column="g", drop_small=0.0)([{"g": GRAPH[:1]}]) == ["a red circle"]   # column
    assert SceneGraphCaptioner()([{"objects": "not json"}, {"objects": "[]"}, {}]) == [None, None, None]
    assert ColumnCaptioner("v")([{"v": " a dog "}, {"v": ""}]) == ["a dog", None]


# --- fusers -------------------------------------------------------------------------------------------------------------
def test_concept_fuser_keeps_names_drops_boilerplate_and_repeats():
    f = ConceptFuser()
    assert f(["ferrari circle sale free 2024"], ["a red circle"]) == ["a red circle, ferrari"]
    assert f(["sale shop"], ["a red circle"]) == ["a red circle"]
    assert ConceptFuser(boilerplate=["ferrari"])(["ferrari sale"], ["a red circle"]) == ["a red circle, sale"]
    assert IdentityFuser()(["alt"], ["visual"]) == ["alt"]


class FakeLM:
    name = "fake"

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, prompt, max_new_tokens=32):
        self.calls.append((prompt, max_new_tokens))
        return type("G", (), {"text": self.answer})()


def test_llm_fuser_prompt_and_parser():
    lm = FakeLM(" A red Ferrari circle.\n\nx => y")
    ex = [("a ; b", "c"), ("d ; e", "f")]
    assert LLMFuser(lm=lm, max_new_tokens=9, examples=ex)(["ferrari sale"], ["a red circle"]) == ["A red Ferrari circle."]
    prompt, n = lm.calls[0]
    assert n == 9 and prompt == fusion_prompt("ferrari sale", "a red circle", ex)
    assert prompt == ("merge the web text and the image description into one caption,\n\na ; b => c\n\nd ; e => f"
                      "\n\nferrari sale ; a red circle =>")
    assert parse_fusion(prompt, "\nA caption") is None and parse_fusion(prompt, "  ") is None
    assert LLMFuser(lm=FakeLM(" "))(["a"], ["b"]) == [None]


# --- data step ----------------------------------------------------------------------------------------------------------
def test_enrich_rows_and_rejects():
    rows = [{"caption": "ikea sale", "objects": json.dumps(GRAPH[:1])}, {"caption": "x", "objects": "[]"},
            {"caption": "sale", "objects": json.dumps(GRAPH[:1])}]
    out = enrich(rows, SceneGraphCaptioner(drop_small=0), type("F", (), {"__call__": lambda s, a, v: [
        None if x == "sale" else ConceptFuser().fuse_one(x, y) for x, y in zip(a, v)]})())
    assert out[0] == ({**rows[0], "visual_caption": "a red circle", "vec_caption": "a red circle, ikea"}, None)
    assert out[1][0] is None and "captioner" in out[1][1]
    assert out[2][0] is None and "fuser" in out[2][1]


def test_enrich_table_resumes_and_passes_keywords(tmp_path, monkeypatch):
    src = tmp_path / "in.csv"
    write_pairs([{"image": f"{i}.png", "alt": f"brand{i} sale", "objects": json.dumps(GRAPH[:1])} for i in range(5)]
                + [{"image": "bad.png", "alt": "", "objects": "[]"}], src)
    out = tmp_path / "vec.parquet"
    res = enrich_table(src, out, SceneGraphCaptioner(drop_small=0), ConceptFuser(), caption_column="alt",
                       chunk_size=2, progress=False)
    rows = read_output(out)
    assert [r["vec_caption"] for r in rows] == [f"a red circle, brand{i}" for i in range(5)]
    assert res.chunks_done == 3 and len(res.rejects) == 1
    assert json.loads(rejects_path(out).read_text())["row"] == 5
    seen = []
    monkeypatch.setattr(veclip, "enrich", lambda rows, c, f, col: seen.append((len(rows), c, f, col)) or [])
    again = enrich_table(src, out, SceneGraphCaptioner(drop_small=0), ConceptFuser(), caption_column="alt",
                         chunk_size=2, progress=False)
    assert again.chunks_skipped == 3 and seen == []                       # resumed: nothing redone
    with pytest.raises(ValueError, match="different curation job"):
        enrich_table(src, out, SceneGraphCaptioner(drop_small=0), IdentityFuser(), caption_column="alt",
                     chunk_size=2, progress=False)
    cap, fu = SceneGraphCaptioner(drop_small=0), IdentityFuser()
    monkeypatch.setattr(veclip, "enrich", lambda rows, c, f, col: seen.append((len(rows), c, f, col)) or
                        [(dict(r), None) for r in rows])
    enrich_table(src, tmp_path / "o2.csv", cap, fu, caption_column="alt", chunk_size=10, progress=False)
    assert seen == [(5, cap, fu, "alt")]


# --- training -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from cliplab.curation.pools import web_pool, write_scene_pool

    d = tmp_path_factory.mktemp("web")
    scenes, rows = web_pool(600, seed=0)
    table = write_scene_pool(d, scenes, rows)
    enrich_table(table, d / "vec.parquet", SceneGraphCaptioner(seed=0), ConceptFuser(), progress=False)
    enrich_table(table, d / "id.parquet", SceneGraphCaptioner(seed=0), IdentityFuser(), progress=False)
    return d


def test_identity_fuser_mix_equals_alt_text_only(web, tmp_path):
    """Exact: VeC-mixing with an identity fuser is the alt-text-only run, loss for loss."""
    from cliplab.curation.evaluation import train_on_table

    alt = train_on_table(web / "vec.parquet", tmp_path / "a", columns=ALT_COLUMNS, steps=6, seed=0)
    ident = train_on_table(web / "id.parquet", tmp_path / "i", columns=VEC_COLUMNS, steps=6, seed=0)
    mix = train_on_table(web / "vec.parquet", tmp_path / "m", columns=VEC_COLUMNS, steps=6, seed=0)
    assert alt.result.losses == ident.result.losses
    assert mix.result.losses != alt.result.losses


@pytest.fixture(scope="module")
def arms(web, tmp_path_factory):
    """Alt-text only, VeC-mixing and VeC only (same steps, seed, images), scored by zero-shot colour classification
    with visual prompts ("a red circle") and with entity prompts in alt-text style ("ferrari", "ferrari sale")."""
    from cliplab.curation.evaluation import train_on_table, zero_shot_accuracy
    from cliplab.curation.pools import BRANDS
    from cliplab.data.synthetic import zero_shot_task
    from cliplab.data.synthetic.vocabulary import SHAPES

    d = tmp_path_factory.mktemp("arms")
    task = zero_shot_task("colour", 10, seed=1)
    visual = [[describe_objects([{"colour": c, "shape": s}]) for s in SHAPES] for c in task.classnames]
    entity = [[BRANDS[c] + x for x in ("", " sale", " official store", " new")] for c in task.classnames]
    out = {}
    for arm, cols in (("alt", ALT_COLUMNS), ("mix", VEC_COLUMNS), ("vec", FUSED_COLUMNS)):
        m = train_on_table(web / "vec.parquet", d / arm, columns=cols, steps=STEPS, seed=0).model
        out[arm] = {"visual": zero_shot_accuracy(m, task.images, task.labels, visual),
                    "entity": zero_shot_accuracy(m, task.images, task.labels, entity)}
    print(out)
    return out


def test_vec_mixing_beats_alt_text_on_visual_queries(arms):
    """Effect: the alt-texts never name a colour; with VeC-mixing the model classifies colours by visual prompts far
    better than the alt-text-only run, and keeps the alt-text's entity knowledge."""
    assert arms["mix"]["visual"] > arms["alt"]["visual"] + 0.25, arms
    assert arms["mix"]["entity"] > arms["alt"]["entity"] - 0.1, arms


def test_vec_only_loses_on_entity_queries(arms):
    """As the paper reports: trained on the VeC alone, the model answers alt-text-style entity queries worse than
    with mixing."""
    assert arms["vec"]["entity"] < arms["mix"]["entity"] - 0.05, arms
