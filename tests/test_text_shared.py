"""Shared pieces of the text-representation methods: caption-to-caption retrieval and the text training loop."""

from __future__ import annotations

import pytest
import torch

from cliplab.eval.paraphrase import read_caption_groups, retrieval_scores, split_groups
from cliplab.text.training import fit, lr_at
from conftest import SHARED_DATA


def test_retrieval_scores_on_hand_made_embeddings():
    # groups 0,0 | 1,1 | 2: row 4 has no relevant row (counted as a miss at every k)
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2], [-1.0, 0.0]])
    group = torch.tensor([0, 0, 1, 1, 2])
    s = retrieval_scores(emb, group, ks=(1, 2))
    # row0: nearest others 1 (rel) -> rank 1; row1: 0 (rel); row2: nearest 3 (rel); row3: nearest 1 then 0, 2 at 4th
    assert s["r@1"] == pytest.approx(3 / 5) and s["r@2"] == pytest.approx(3 / 5)
    assert s["mrr"] == pytest.approx((1 + 1 + 1 + 1 / 3 + 0) / 5)


def test_split_groups_keeps_whole_images_apart(tmp_path):
    (tmp_path / "c.csv").write_text("image,caption\n" + "".join(f"{i % 7}.jpg,caption {i}\n" for i in range(35))
                                    + "lonely.jpg,only one\n")
    groups = read_caption_groups(tmp_path / "c.csv")
    assert len(groups) == 7 and all(len(c) == 5 for _, c in groups)  # the single-caption image is left out
    train, held = split_groups(groups, held_out=2, seed=1)
    assert len(held) == 2 and not {g for g, _ in train} & {g for g, _ in held}
    assert split_groups(groups, held_out=2, seed=1) == (train, held)


def test_fit_trains_and_is_seeded():
    def run(seed):
        w = torch.nn.Parameter(torch.zeros(3))
        target = torch.tensor([1.0, -2.0, 0.5])

        def step(i):
            noise = torch.randn(3) * 0.01  # the loop seeds the global RNG
            return ((w - target + noise) ** 2).sum(), {"w0": w[0].detach()}

        res = fit([w], step, steps=200, lr=0.1, warmup=10, seed=seed, progress=False)
        return w.detach(), res

    a, res = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, torch.tensor([1.0, -2.0, 0.5]), atol=0.05) and res.losses[-1] < res.losses[0] / 100
    assert res.records[-1]["step"] == 200 and "w0" in res.records[-1]
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(99 + 1, 100, 1.0, 10) == pytest.approx(0.0)


def test_real_flickr_groups_hold_five_captions_each():
    path = SHARED_DATA / "flickr8k-1k" / "all_captions.csv"
    if not path.exists():
        pytest.skip(f"needs the project's real data at {path}")
    groups = read_caption_groups(path)
    assert len(groups) == 8091 and sum(len(c) for _, c in groups) == 40455


def test_saved_embedders_load_back_by_path(tmp_path, minilm, smollm2):
    import cliplab.text as text

    texts = ["A man plays a guitar.", "", "Two dogs run on the beach."]
    for emb in (minilm, text.DecoderEmbedder.from_lm(smollm2, "last")):
        path = emb.save(tmp_path / emb.name)
        back = text.load_embedder(str(path))
        assert type(back) is type(emb) and back.default_pooling == emb.default_pooling
        assert torch.equal(back.encode(texts), emb.encode(texts))
    assert (tmp_path / "smollm2-135m" / "model.safetensors").stat().st_size < 600e6  # the tied head is stored once
    from click.testing import CliRunner

    from cliplab.cli import main

    sts = SHARED_DATA / "stsb" / "sts-dev.csv"
    if sts.exists():
        r = CliRunner().invoke(main, ["eval", "sts", "-e", str(tmp_path / "all-MiniLM-L6-v2"), "--data", str(sts),
                                      "--limit", "20"])
        assert r.exit_code == 0 and "Spearman" in r.output
