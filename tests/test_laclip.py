"""LaCLIP (cliplab.curation.laclip): prompt and parser, rewriters, uniform per-visit version sampling, effect."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cliplab.curation import laclip
from cliplab.curation.laclip import (META_PAIRS, LLMRewriter, build_prompt, parse_rewrite, rewrite_captions,
                                     rewrite_table, same_image_pairs, sample_examples)
from cliplab.curation.multicaption import TICKETS, VersionSampler, row_versions, version_of
from cliplab.curation.pairs_io import read_output, rejects_path, write_pairs
from cliplab.curation.rewriters import IdentityRewriter, RuleRewriter

STEPS = 70  # per arm; experiments/curation_laclip.py runs 300 steps


# --- prompt and parser -------------------------------------------------------------------------------------------------
EXAMPLES = [("a dog", "A dog sits."), ("red car", "A red car."), ("two kids", "Two children play.")]


def test_prompt_is_byte_exact():
    expected = ("write image captions differently,\n\na dog => A dog sits.\n\nred car => A red car.\n\n"
                "two kids => Two children play.\n\na child on the stairs =>")
    assert build_prompt("a child on\n the stairs", EXAMPLES) == expected  # line breaks inside are removed
    with pytest.raises(ValueError):
        build_prompt("x", EXAMPLES[:2])


def test_parser_takes_line_eight_after_the_arrow():
    prompt = build_prompt("a child on the stairs", EXAMPLES)
    assert parse_rewrite(prompt, " A kid climbs a staircase. \n\nblue sky => x") == "A kid climbs a staircase."
    assert parse_rewrite(prompt, " first line only") == "first line only"
    assert parse_rewrite(prompt, "\nA kid") is None              # the answer starts on the next line: nothing on line 8
    assert parse_rewrite(prompt, "   ") is None
    assert parse_rewrite("too\nshort", " x") is None


def test_examples_are_distinct_draws_and_same_image_pairs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ex = sample_examples(META_PAIRS, rng)
        assert len(set(ex)) == 3 and all(e in META_PAIRS for e in ex)
    pairs = same_image_pairs({"a.jpg": ["x one", "x two", "x three"], "b.jpg": ["only"], "c.jpg": ["c1", "c2"]})
    assert len(pairs) == 2 and pairs[0][0] != pairs[0][1] and set(pairs[1]) == {"c1", "c2"}


class FakeLM:
    """Stands in for a CausalLM: records prompts, answers with a fixed continuation."""

    name = "fake"

    def __init__(self, answer=" A rewritten caption.\n\nnext => y"):
        self.answer, self.prompts = answer, []

    def generate(self, prompt, max_new_tokens=32):
        self.prompts.append((prompt, max_new_tokens))
        return type("G", (), {"text": self.answer})()


def test_llm_rewriter_prompts_parses_and_falls_back():
    lm = FakeLM()
    rw = LLMRewriter(lm=lm, seed=3, max_new_tokens=17)
    assert rw(["a cat"], version=0) == ["A rewritten caption."]
    prompt, n = lm.prompts[0]
    assert n == 17 and prompt.endswith("\n\na cat =>") and prompt == rw.prompt("a cat", 0)
    assert rw.prompt("a cat", 1) != rw.prompt("a cat", 0)          # versions draw other examples
    assert LLMRewriter(lm=lm, seed=4).prompt("a cat", 0) != rw.prompt("a cat", 0)   # seed reaches the draw
    bad = LLMRewriter(lm=FakeLM("\n"), meta_pairs=EXAMPLES)
    assert bad(["a cat"]) == ["a cat"] and bad.failures == 1


def test_smollm2_rewrites_real_captions(smollm2):
    """The real LM (one short generation): the answer parses into a non-empty one-line rewrite."""
    rw = LLMRewriter(lm=smollm2, max_new_tokens=16)
    out = rw(["A black dog is running through the grass ."])
    assert all(o and "\n" not in o and "=>" not in o for o in out), out


# --- rule rewriter -------------------------------------------------------------------------------------------------------
def test_rule_rewriter_is_deterministic_and_changes_wording():
    rw = RuleRewriter(seed=0)
    caps = ["a man is running on the street", "a small dog near the ocean", "two children play in the grass"]
    a, b = rw(caps, version=0), rw(caps, version=0)
    assert a == b and all(x.lower() != c for x, c in zip(a, caps))
    assert rw(caps, version=1) != a
    assert RuleRewriter(seed=5)(caps) != a


def test_rule_rewriter_keywords_reach_the_rewrite():
    cap = "a man is running on the street"
    assert RuleRewriter(swap_prob=0, reorder_prob=0, frame_prob=1, frames=["X {} Y"])([cap]) == [f"X {cap} Y"]
    assert RuleRewriter(swap_prob=0, reorder_prob=1, frame_prob=0)([cap]) == ["on the street, a man is running"]
    assert RuleRewriter(swap_prob=1, reorder_prob=0, frame_prob=0, synonyms={"man": ["guy"]})([cap]) == \
        ["a guy is running on the street"]
    assert RuleRewriter(swap_prob=0, reorder_prob=0, frame_prob=0, tries=3)([cap]) == [cap]
    with pytest.raises(ValueError):
        RuleRewriter(swap_prob=1.5)


def test_rewrite_captions_versions():
    rw = RuleRewriter(seed=1)
    out = rewrite_captions(["a dog", "a cat near the sea"], rw, k=3)
    assert [len(v) for v in out] == [3, 3] and out[1] == [rw(["a cat near the sea"], version=v)[0] for v in range(3)]
    assert rewrite_captions(["a dog"], IdentityRewriter(), k=2) == [["a dog", "a dog"]]


# --- per-visit sampling ----------------------------------------------------------------------------------------------------
def test_tickets_select_each_version_equally_often():
    for n in range(1, 11):
        counts = np.bincount([version_of(r, n) for r in range(1, TICKETS + 1)], minlength=n)
        assert (counts == TICKETS // n).all()


def test_version_draws_are_uniform_chi_squared():
    """Fixed seed: the versions a row gets over 2,000 steps of batch 16 pass a chi-squared test of uniformity."""
    from scipy.stats import chisquare

    sampler = VersionSampler(size=40, batch_size=16, seed=0)
    draws: dict[int, list[int]] = {}
    for step in range(2000):
        for idx in sampler.batch(step):
            image, ticket = idx % 40, idx // 40
            draws.setdefault(image, []).append(ticket)
    n_versions = 5
    counts = np.bincount([version_of(t, n_versions) for ts in draws.values() for t in ts], minlength=n_versions)
    assert chisquare(counts).pvalue > 0.01, counts
    assert min(counts) > 0.9 * counts.mean()


def test_images_follow_the_random_sampler():
    from cliplab.train import RandomSampler

    v, r = VersionSampler(size=37, batch_size=8, seed=3), RandomSampler(size=37, batch_size=8, seed=3)
    for step in range(20):
        assert [i % 37 for i in v.batch(step)] == r.batch(step)
        assert all(i >= 37 for i in v.batch(step))


def test_row_versions_reads_lists_json_and_skips_empty():
    assert row_versions({"caption": "a", "rewrites": ["b", "", "c"]}, ["caption", "rewrites"]) == ["a", "b", "c"]
    assert row_versions({"caption": "a", "rewrites": json.dumps(["b"])}, ["caption", "rewrites"]) == ["a", "b"]
    assert row_versions({"caption": " ", "x": None}, ["caption", "x"]) == []


# --- tables and training -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from cliplab.curation.pools import template_pool, write_scene_pool

    d = tmp_path_factory.mktemp("laclip")
    scenes, rows = template_pool(600, seed=0)
    return write_scene_pool(d, scenes, rows)


def test_rewrite_table_writes_k_rewrites_and_rejects(tmp_path):
    src = tmp_path / "in.csv"
    write_pairs([{"image": "a.png", "caption": "a dog on the grass"}, {"image": "b.png", "caption": "  "},
                 {"image": "c.png", "caption": "a man near the sea"}], src)
    out = tmp_path / "out.csv"
    result = rewrite_table(src, out, RuleRewriter(seed=2), k=3, chunk_size=1, progress=False)
    rows = read_output(out, list_columns=["rewrites"])
    assert [r["row"] for r in rows] == [0, 2] and all(len(r["rewrites"]) == 3 for r in rows)
    assert rows[1]["rewrites"] == [RuleRewriter(seed=2)(["a man near the sea"], version=v)[0] for v in range(3)]
    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1] and "empty caption" in rejects[0]["reason"]
    assert result.chunks_done == 3
    again = rewrite_table(src, out, RuleRewriter(seed=2), k=3, chunk_size=1, progress=False)
    assert again.chunks_done == 0 and again.chunks_skipped == 3


def test_rewrite_table_keywords_reach_the_rewriter(tmp_path, monkeypatch):
    src = tmp_path / "in.csv"
    write_pairs([{"text": "a dog"}, {"text": "a cat"}], src)
    seen = []
    monkeypatch.setattr(laclip, "rewrite_captions", lambda caps, rw, k: seen.append((caps, rw, k)) or [["x"] * k] * len(caps))
    rw = IdentityRewriter()
    rewrite_table(src, tmp_path / "o.parquet", rw, k=2, caption_column="text", chunk_size=5, progress=False)
    assert seen == [(["a dog", "a cat"], rw, 2)]


def test_identity_rewriter_run_equals_the_baseline_run(pool, tmp_path):
    """Exact: training on identity "rewrites" (versions all equal to the caption) is the baseline run, loss for
    loss: same images (the sampler follows the random sampler), same captions."""
    from cliplab.curation.evaluation import train_on_table

    rewrite_table(pool, tmp_path / "id.parquet", IdentityRewriter(), k=4, progress=False)
    base = train_on_table(pool, tmp_path / "base", steps=12, seed=0, versions=False)
    ident = train_on_table(tmp_path / "id.parquet", tmp_path / "ident", columns=["caption", "rewrites"], steps=12,
                           seed=0)
    assert base.result.losses == ident.result.losses
    rule_path = tmp_path / "rule.parquet"
    rewrite_table(pool, rule_path, RuleRewriter(), k=4, progress=False)
    rule = train_on_table(rule_path, tmp_path / "rule", columns=["caption", "rewrites"], steps=12, seed=0)
    assert rule.result.losses != base.result.losses


def test_source_refuses_the_plain_random_sampler(pool, tmp_path):
    from cliplab.train import DataConfig, Trainer, get_preset

    cfg = get_preset("tiny-smoke").replace(data=DataConfig(source="caption-versions", options={"path": str(pool), "columns": ["caption"]}),
                                           steps=1, progress=False, out_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="sampler='caption-versions'"):
        Trainer(cfg).batches[0]


def test_rewrites_help_held_out_phrasings(pool, tmp_path):
    """Effect: trained with rule rewrites drawn per visit, the model classifies colours with held-out phrasings better
    than the same run on the original captions (same steps, seed, images)."""
    from cliplab.curation.evaluation import train_on_table, zero_shot_accuracy
    from cliplab.curation.pools import HELDOUT_TEMPLATES
    from cliplab.data.synthetic import zero_shot_task
    from cliplab.data.synthetic.vocabulary import SHAPES

    rewrite_table(pool, tmp_path / "rule.parquet", RuleRewriter(), k=4, progress=False)
    task = zero_shot_task("colour", 10, seed=1)

    def heldout(model):
        return float(np.mean([zero_shot_accuracy(model, task.images, task.labels,
                                                 [[t.format(colour=c, shape=s) for s in SHAPES] for c in task.classnames])
                              for t in HELDOUT_TEMPLATES]))

    torch.manual_seed(0)
    base = heldout(train_on_table(pool, tmp_path / "b", steps=STEPS, seed=0).model)
    rule = heldout(train_on_table(tmp_path / "rule.parquet", tmp_path / "r", columns=["caption", "rewrites"],
                                  steps=STEPS, seed=0).model)
    print({"rule": rule, "base": base})
    assert rule > base + 0.1, (rule, base)
