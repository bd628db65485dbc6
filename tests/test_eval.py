"""The evaluation harness: metrics against brute-force references and hand-built oracles (ties included), the
embedding cache (no re-encoding, resuming after an interruption), dataset adapters, and end-to-end runs on small
real subsets and the synthetic world."""

from __future__ import annotations

import csv
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import cliplab
from cliplab.cli import main
from cliplab.eval import (
    CaptionData,
    ClassificationData,
    EmbeddingCache,
    ImageItem,
    WinogroundData,
    chance_i2t_recall,
    clip_score,
    compute_metrics,
    evaluate,
    list_datasets,
    load_dataset,
    model_identity,
    prettify_classname,
    ref_clip_score,
    retrieval_ranks,
    retrieval_recall,
    target_ranks,
    topk_accuracy,
    winoground_scores,
)
from conftest import shared_path

SMALL = settings(max_examples=150, deadline=None)


# --- brute-force references ------------------------------------------------------------------------------------------
def order_desc(scores: list) -> list[int]:
    """Candidates best first; ties broken by lower index (the documented rule)."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def bf_rank(scores: list, target: int) -> int:
    return order_desc(scores).index(target)


def bf_retrieval(sim: list[list], owner: list[int], k: int) -> tuple[float, float]:
    n_img = len(sim)
    i2t = []
    for i in range(n_img):
        if i not in owner:
            continue  # an image without captions is left out of image->text recall
        top = order_desc(sim[i])[:k]
        i2t.append(any(owner[t] == i for t in top))
    t2i = []
    for t in range(len(owner)):
        col = [sim[i][t] for i in range(n_img)]
        t2i.append(owner[t] in order_desc(col)[:k])
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


int_matrix = st.integers(1, 6).flatmap(lambda n: st.integers(1, 7).flatmap(
    lambda m: st.lists(st.lists(st.integers(-2, 2), min_size=m, max_size=m), min_size=n, max_size=n)))


# --- classification metrics ------------------------------------------------------------------------------------------
@SMALL
@given(int_matrix, st.data())
def test_target_ranks_and_topk_match_brute_force(rows, data):
    labels = [data.draw(st.integers(0, len(rows[0]) - 1)) for _ in rows]
    ranks = target_ranks(torch.tensor(rows, dtype=torch.float32), torch.tensor(labels))
    assert ranks.tolist() == [bf_rank(r, y) for r, y in zip(rows, labels)]
    acc = topk_accuracy(torch.tensor(rows, dtype=torch.float32), torch.tensor(labels), ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert acc[k] == pytest.approx(sum(bf_rank(r, y) < k for r, y in zip(rows, labels)) / len(rows))
    m = compute_metrics("zeroshot", logits=torch.tensor(rows, dtype=torch.float32), labels=torch.tensor(labels))
    c = len(rows[0])
    cm = [[0] * c for _ in range(c)]
    for r, y in zip(rows, labels):
        cm[y][order_desc(r)[0]] += 1
    assert m["confusion_matrix"] == cm
    recalls = [cm[k][k] / sum(cm[k]) for k in range(c) if sum(cm[k])]
    assert m["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls))
    assert m["top1"] == pytest.approx(sum(cm[k][k] for k in range(c)) / len(rows))


# --- an oracle "model": embeddings chosen by the test ----------------------------------------------------------------
class OracleModel:
    """Implements what the harness uses of a CLIP model; image 'pixels' are integer ids, text vectors a lookup."""

    def __init__(self, image_vecs: dict[int, list[float]], text_vecs: dict[str, list[float]]):
        self.image_vecs = {k: torch.tensor(v, dtype=torch.float32) for k, v in image_vecs.items()}
        self.text_vecs = {k: torch.tensor(v, dtype=torch.float32) for k, v in text_vecs.items()}
        dim = len(next(iter(image_vecs.values())))
        self.config = SimpleNamespace(name="oracle", embed_dim=dim, tokenizer="oracle",
                                      text=SimpleNamespace(context_length=8), to_dict=lambda: {"oracle": dim})
        self.preprocessor = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"oracle": True}), alpha="drop",
                                            batch=lambda ids: torch.tensor(list(ids)))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.logit_scale = torch.tensor(math.log(100.0))
        self.image_calls = self.text_calls = 0
        self._texts: list[str] = []

    def tokenize(self, texts):
        start = len(self._texts)
        self._texts += list(texts)
        return SimpleNamespace(ids=torch.arange(start, len(self._texts))[:, None],
                               lengths=torch.tensor([len(t) for t in texts]))

    def encode_text(self, ids):
        self.text_calls += 1
        return torch.stack([self.text_vecs[self._texts[int(i)]] for i in ids[:, 0]])

    def encode_image(self, pixels):
        self.image_calls += 1
        return torch.stack([self.image_vecs[int(i)] for i in pixels])


def e(i: int, dim: int = 8, scale: float = 1.0) -> list[float]:
    v = [0.0] * dim
    v[i] = scale
    return v


def test_zeroshot_oracle_with_ties_gives_the_hand_computed_numbers():
    # class k's prompts embed as e_k + 0.5 e6 ("a ...") and e_k + 0.5 e7 ("the ..."); class c5 shares c4's vectors
    names = [f"c{k}" for k in range(6)]
    text = {}
    for k, n in enumerate(names):
        base = min(k, 4)
        text[f"a {n}"] = [a + 0.5 * b for a, b in zip(e(base), e(6))]
        text[f"the {n}"] = [a + 0.5 * b for a, b in zip(e(base), e(7))]
    # (label, image vector); the expected outcome is noted per image
    images = [(0, e(0)),                       # right
              (1, e(1, scale=3.0)),            # right (scale is irrelevant)
              (2, e(3)),                       # predicted 3; true class ties with 0,1,4,5 at 0 -> rank 3 (top-5 hit)
              (5, e(4)),                       # c4 == c5: tie, the lower index (4) wins -> wrong, rank 1
              (4, e(4)),                       # right
              (3, [-x for x in e(3)]),         # true class last (rank 5): top-5 miss; prediction: 0 (5-way tie)
              (0, [a + b for a, b in zip(e(6), e(7))])]  # every class ties: index 0 wins -> right
    model = OracleModel({i: v for i, (_, v) in enumerate(images)}, text)
    data = ClassificationData("oracle", names, [ImageItem(f"oracle:{i}", i) for i in range(len(images))],
                              [y for y, _ in images])
    res = evaluate("zeroshot", model, data, model_id="oracle", cache_dir=None, templates=["a {}", "the {}"])
    m = res["metrics"]
    assert m["top1"] == pytest.approx(4 / 7) and m["top5"] == pytest.approx(6 / 7)
    assert m["per_class_recall"] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    expected_cm = [[0] * 6 for _ in range(6)]
    for y, p in [(0, 0), (1, 1), (2, 3), (5, 4), (4, 4), (3, 0), (0, 0)]:
        expected_cm[y][p] += 1
    assert m["confusion_matrix"] == expected_cm
    assert m["chance_top1"] == pytest.approx(1 / 6) and m["chance_top5"] == pytest.approx(5 / 6)


# --- retrieval -------------------------------------------------------------------------------------------------------
def retrieval_oracle():
    # images e0, e1, e2; captions (owner): T0 (I0) = e1, T1 (I0) = e0 + e1, T2 (I1) = e1, T3 (I2) = e0, T4 (I2) = e3
    images = {0: e(0, 4), 1: e(1, 4), 2: e(2, 4)}
    caps = ["t0", "t1", "t2", "t3", "t4"]
    vecs = {"t0": e(1, 4), "t1": [1.0, 1.0, 0.0, 0.0], "t2": e(1, 4), "t3": e(0, 4), "t4": e(3, 4)}
    owner = [0, 0, 1, 2, 2]
    data = CaptionData("oracle", [ImageItem(f"oracle:{i}", i) for i in range(3)], caps, owner)
    return OracleModel(images, vecs), data, owner


def test_retrieval_oracle_with_multi_caption_images_and_ties():
    model, data, owner = retrieval_oracle()
    res = evaluate("retrieval", model, data, model_id="oracle", cache_dir=None)
    m = res["metrics"]
    # I0: texts ordered T3, T1, T0, T2, T4 -> own best T1 at 1; I1: T0, T2 tie at 1.0 -> T2 at 1; I2: all 0 -> T3 at 3
    assert [m["image_to_text"][f"R@{k}"] for k in (1, 5, 10)] == [0.0, 1.0, 1.0]
    # T0 -> I1 first (rank 1); T1 ties I0/I1 (I0 first); T2 rank 0; T3 -> I0, I1, I2 (rank 2); T4 all tie (rank 2)
    assert [m["text_to_image"][f"R@{k}"] for k in (1, 5, 10)] == [pytest.approx(0.4), 1.0, 1.0]
    sim = F.normalize(torch.stack([model.image_vecs[i] for i in range(3)]), dim=-1) @ F.normalize(
        torch.stack([model.text_vecs[c] for c in data.captions]), dim=-1).t()
    i2t, t2i = retrieval_ranks(sim, torch.tensor(owner))
    assert i2t.tolist() == [1, 1, 3] and t2i.tolist() == [1, 0, 0, 2, 2]
    r = retrieval_recall(sim, torch.tensor(owner), ks=(2, 3))
    assert r["image_to_text"] == {"R@2": pytest.approx(2 / 3), "R@3": pytest.approx(2 / 3)}
    assert r["text_to_image"] == {"R@2": pytest.approx(0.6), "R@3": 1.0}


@SMALL
@given(int_matrix, st.data())
def test_retrieval_recall_matches_brute_force(sim, data):
    n_img, n_txt = len(sim), len(sim[0])
    owner = [data.draw(st.integers(0, n_img - 1)) for _ in range(n_txt)]
    ks = (1, 2, 3)
    r = retrieval_recall(torch.tensor(sim), torch.tensor(owner), ks=ks)
    for k in ks:
        i2t, t2i = bf_retrieval(sim, owner, k)
        assert r["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
        assert r["text_to_image"][f"R@{k}"] == pytest.approx(t2i)


def test_chance_recall_matches_enumeration():
    # 4 texts, image with 2 captions, k=1: P = 2/4; k=2: 1 - C(2,2)/C(4,2) = 5/6
    assert chance_i2t_recall(4, [2], 1) == pytest.approx(0.5)
    assert chance_i2t_recall(4, [2], 2) == pytest.approx(5 / 6)
    assert chance_i2t_recall(4, [1, 3], 1) == pytest.approx((1 / 4 + 3 / 4) / 2)


# --- CLIPScore -------------------------------------------------------------------------------------------------------
def test_clipscore_formula_and_clip_at_zero():
    img = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    cap = torch.tensor([[0.6, 0.8], [-0.6, 0.8], [0.0, -1.0]]) * 3  # scales must not matter
    cs = clip_score(img, cap)
    torch.testing.assert_close(cs, torch.tensor([2.5 * 0.6, 0.0, 0.0]))
    torch.testing.assert_close(clip_score(img, cap, w=1.0), torch.tensor([0.6, 0.0, 0.0]))


def test_refclipscore_is_the_harmonic_mean():
    img = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cand = torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    refs = [torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),   # max ref cos 0.8
            torch.tensor([[0.0, -1.0, 0.0]]),                   # ref cos -0.8 -> clipped to 0 -> HM 0
            torch.tensor([[1.0, 0.0, 0.0]]),                    # CLIPScore 0, ref 1 -> HM 0
            torch.empty(0, 3)]                                  # no references -> NaN
    r = ref_clip_score(img, cand, refs)
    a, b = 2.5 * 0.6, 0.8
    assert r[0].item() == pytest.approx(2 * a * b / (a + b))
    assert r[1].item() == 0.0 and r[2].item() == 0.0 and math.isnan(r[3].item())


def test_clipscore_task_uses_the_other_captions_as_references():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    m = compute_metrics("clipscore", image_features=img, text_features=txt, caption_image=torch.tensor([0, 0, 1]))
    cs = [2.5, 2.5 * math.sqrt(0.5), 2.5]
    assert m["clipscore_per_caption"] == pytest.approx(cs)
    assert m["clipscore"] == pytest.approx(sum(cs) / 3)
    hm = 2 * cs[0] * math.sqrt(0.5) / (cs[0] + math.sqrt(0.5))  # captions 0 and 1 reference each other
    hm1 = 2 * cs[1] * math.sqrt(0.5) / (cs[1] + math.sqrt(0.5))
    assert m["refclipscore"] == pytest.approx((hm + hm1) / 2) and m["refclipscore_captions"] == 2


# --- Winoground ------------------------------------------------------------------------------------------------------
def test_winoground_oracle_scores_and_ties():
    # scores[p, c, i]
    s = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0]],   # all correct
        [[0.9, 0.5], [0.1, 0.6]],   # text: .9>.1, .6>.5 yes; image: .9>.5 yes, .6>.1 yes -> all
        [[0.5, 0.9], [0.1, 0.6]],   # text: .5>.1 and .6>.9 no; image: .5>.9 no -> none
        [[0.5, 0.2], [0.5, 0.6]],   # tie s(c0,i0) == s(c1,i0): text fails; image: .5>.2, .6>.5 -> image only
        [[0.7, 0.2], [0.3, 0.1]],   # text: .7>.3, .1>.2 no; image: .7>.2, .1>.3 no -> none
        [[0.3, 0.9], [0.1, 0.8]],   # text: .3>.1, .8>.9 no... image: .3>.9 no -> none
        [[0.8, 0.2], [0.9, 0.9]],   # text: .8>.9 no; image: .8>.2, .9>.9 tie -> none
        [[0.4, 0.1], [0.2, 0.5]],   # text: .4>.2, .5>.1; image: .4>.1, .5>.2 -> all
    ])
    r = winoground_scores(s)
    assert r["text"].tolist() == [True, True, False, False, False, False, False, True]
    assert r["image"].tolist() == [True, True, False, True, False, False, False, True]
    assert r["group"].tolist() == [True, True, False, False, False, False, False, True]
    m = compute_metrics("winoground", scores=s, kinds=["a", "b"] * 4)
    assert (m["text_score"], m["image_score"], m["group_score"]) == (3 / 8, 4 / 8, 3 / 8)
    assert m["by_kind"]["b"] == {"text_score": 0.5, "image_score": 0.75, "group_score": 0.5, "pairs": 4}
    assert winoground_scores(torch.zeros(3, 2, 2))["group"].sum() == 0  # a constant model scores 0


@SMALL
@given(st.lists(st.lists(st.integers(0, 2), min_size=4, max_size=4), min_size=1, max_size=8))
def test_winoground_matches_brute_force(flat):
    s = torch.tensor(flat, dtype=torch.float32).view(-1, 2, 2)
    r = winoground_scores(s)
    for p, v in enumerate(flat):
        s00, s01, s10, s11 = v  # s[c][i]
        text = s00 > s10 and s11 > s01
        image = s00 > s01 and s11 > s10
        assert (r["text"][p].item(), r["image"][p].item(), r["group"][p].item()) == (text, image, text and image)


def test_winoground_task_through_the_pipeline():
    # pair 0: captions match their images; pair 1: swapped (everything wrong)
    images = {0: e(0, 4), 1: e(1, 4), 2: e(2, 4), 3: e(3, 4)}
    vecs = {"p0 c0": e(0, 4), "p0 c1": e(1, 4), "p1 c0": e(3, 4), "p1 c1": e(2, 4)}
    data = WinogroundData("oracle", [ImageItem(f"o:{i}", i) for i in range(4)], list(vecs), ["x", "y"])
    m = evaluate("winoground", OracleModel(images, vecs), data, model_id="oracle", cache_dir=None)["metrics"]
    assert m["by_kind"]["x"]["group_score"] == 1.0 and m["by_kind"]["y"]["text_score"] == 0.0
    assert m["group_score"] == 0.5


# --- the embedding cache ---------------------------------------------------------------------------------------------
def test_second_run_with_other_templates_does_not_encode_images(tmp_path):
    names = ["c0", "c1"]
    text = {f"{t} {n}": e(k, 4) for k, n in enumerate(names) for t in ("a", "the", "one")}
    model = OracleModel({i: e(i % 2, 4) for i in range(10)}, text)
    data = ClassificationData("o", names, [ImageItem(f"o:{i}", i) for i in range(10)], [i % 2 for i in range(10)])
    r1 = evaluate("zeroshot", model, data, model_id="m", cache_dir=tmp_path, templates=["a {}"], batch_size=4)
    assert model.image_calls == 3 and r1["cache"]["image"] == {"cached": 0, "encoded": 10}
    r2 = evaluate("zeroshot", model, data, model_id="m", cache_dir=tmp_path, templates=["the {}", "one {}"],
                  batch_size=4)
    assert model.image_calls == 3 and r2["cache"]["image"] == {"cached": 10, "encoded": 0}
    assert r2["cache"]["text"] == {"cached": 0, "encoded": 4} and r2["metrics"]["top1"] == 1.0
    calls = model.text_calls
    evaluate("zeroshot", model, data, model_id="m", cache_dir=tmp_path, templates=["a {}", "one {}"])
    assert model.text_calls == calls and model.image_calls == 3  # everything cached now
    evaluate("zeroshot", model, data, model_id="other", cache_dir=tmp_path, templates=["a {}"])
    assert model.image_calls == 4  # another model id is another cache


def test_interrupted_run_resumes_and_encodes_only_the_rest(tmp_path):
    model = cliplab.create_model("test-tiny", seed=0).eval()
    data = load_dataset("synthetic-zeroshot", kind="colour", n_per_class=2, image_size=32)  # 16 images
    fresh = evaluate("zeroshot", model, data, model_id="t", cache_dir=None)["metrics"]

    calls = {"n": 0}
    original = model.encode_image

    def flaky(pixels, normalize=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like Ctrl-C during the third chunk
        return original(pixels, normalize)

    model.encode_image = flaky
    with pytest.raises(KeyboardInterrupt):
        evaluate("zeroshot", model, data, model_id="t", cache_dir=tmp_path, batch_size=4)
    space = next(p for p in (tmp_path / "t").iterdir() if p.name.startswith("image-"))
    assert len(list(space.glob("chunk-*.npz"))) == 2 and not list(space.glob(".*tmp"))
    calls["n"] = 100  # no more failures; count the resumed run's calls
    res = evaluate("zeroshot", model, data, model_id="t", cache_dir=tmp_path, batch_size=4)
    assert calls["n"] - 100 == 2 and res["cache"]["image"] == {"cached": 8, "encoded": 8}
    assert res["metrics"]["confusion_matrix"] == fresh["confusion_matrix"]
    model.encode_image = original


def test_cache_keys_follow_file_content_and_model_identity(tmp_path):
    root = tmp_path / "imgs"
    for cls, colour in (("red_thing", "red"), ("blue_thing", "blue")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(root / cls / f"{i}.png")
    model = cliplab.create_model("test-tiny", seed=0).eval()
    kw = dict(dataset_options={"root": str(root)}, cache_dir=tmp_path / "cache", templates="single")
    r1 = evaluate("zeroshot", model, "image-folder", **kw)
    assert r1["cache"]["image"]["encoded"] == 4 and r1["classnames"] == ["blue thing", "red thing"]
    target = root / "red_thing" / "0.png"
    Image.new("RGB", (40, 30), "green").save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    r2 = evaluate("zeroshot", model, "image-folder", **kw)
    assert r2["cache"]["image"] == {"cached": 3, "encoded": 1}
    assert model_identity(model) == model_identity(cliplab.create_model("test-tiny", seed=0))
    assert model_identity(model) != model_identity(cliplab.create_model("test-tiny", seed=1))
    model.save(tmp_path / "saved")
    assert model_identity(model, tmp_path / "saved") == model_identity(cliplab.load(tmp_path / "saved"),
                                                                        tmp_path / "saved")


def test_cache_ignores_a_damaged_chunk(tmp_path):
    space = EmbeddingCache(tmp_path, "m").space({"kind": "image", "x": 1})
    space.put(["a", "b"], torch.ones(2, 3))
    (space.dir / "chunk-broken.npz").write_bytes(b"not a zip")
    fresh = EmbeddingCache(tmp_path, "m").space({"kind": "image", "x": 1})
    with pytest.warns(UserWarning, match="unreadable cache chunk"):
        assert fresh.missing(["a", "b", "c"]) == ["c"]
    assert torch.equal(fresh.get(["b"]), torch.ones(1, 3))


# --- dataset adapters ------------------------------------------------------------------------------------------------
def test_dataset_registry_and_adapters(tmp_path):
    assert {"image-folder", "cifar-folder", "captions-csv", "synthetic-zeroshot", "synthetic-winoground",
            "synthetic-retrieval"} <= set(list_datasets())
    assert prettify_classname("maple_tree") == "maple tree" and prettify_classname("003.PickupTruck") == "pickup truck"
    for cls in ("plane", "car", "maple_tree"):
        (tmp_path / "c" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "c" / cls / f"{i:04d}.png")
    d = load_dataset("cifar-folder", root=str(tmp_path / "c"), per_class=2)
    assert d.classnames == ["automobile", "maple tree", "airplane"] and d.labels == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="unknown options"):
        load_dataset("cifar-folder", root=str(tmp_path / "c"), per_klass=2)
    (tmp_path / "images").mkdir()
    rows = [("x.png", "one"), ("y.png", "two"), ("x.png", "three"), ("z.png", "four")]
    for name in ("x.png", "y.png", "z.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    c = load_dataset("captions-csv", csv_path=str(tmp_path / "caps.csv"), limit=2)
    assert c.captions == ["one", "two", "three"] and c.caption_image == [0, 1, 0] and len(c.items) == 2
    r = load_dataset("synthetic-retrieval", n=5, seed=3)
    assert len(r.items) == 5 and r.caption_image == list(range(5)) and r.items[0].load().size == (64, 64)
    w = load_dataset("synthetic-winoground", n=4, kinds="colour,relation")
    assert w.kinds == ["colour", "relation"] * 2 and len(w.items) == 8


def test_synthetic_evaluations_run_with_a_random_model(tmp_path):
    model = cliplab.create_model("test-tiny", seed=0).eval()
    for task, ds, opts in (("winoground", "synthetic-winoground", {"n": 8}),
                           ("retrieval", "synthetic-retrieval", {"n": 12}),
                           ("clipscore", "synthetic-retrieval", {"n": 12}),
                           ("zeroshot", "synthetic-zeroshot", {"kind": "shape", "n_per_class": 2})):
        res = evaluate(task, model, ds, dataset_options=opts, cache_dir=tmp_path / "cache", out_dir=tmp_path / task)
        saved = json.loads((tmp_path / task / "results.json").read_text())
        assert saved["metrics"] == json.loads(json.dumps(res["metrics"]))
        assert (tmp_path / task / "summary.md").read_text().startswith(f"# {task} evaluation")


# --- end to end on real data (random model: valid numbers near chance) -----------------------------------------------
def test_cifar10_zero_shot_end_to_end_via_cli(tmp_path):
    root = shared_path("cifar10-test")
    prompts = shared_path("clip-prompts", "prompts.md")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [
        "eval", "zeroshot", "--model", "test-tiny", "--random-init", "--dataset", "cifar-folder", "--data", str(root),
        "-O", "per_class=20", "--templates", f"{prompts}#CIFAR10", "--out", str(out), "--cache-dir",
        str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert res["num_images"] == 200 and res["num_classes"] == 10 and res["prompts"]["templates"] == 18
    assert res["classnames"][1] == "automobile" and res["cache"]["text"]["encoded"] == 180
    assert sum(map(sum, m["confusion_matrix"])) == 200 and all(sum(row) == 20 for row in m["confusion_matrix"])
    assert 0 <= m["top1"] <= m["top5"] <= 1 and m["top1"] < 0.3 and m["top5"] < 0.85  # chance: 0.1 / 0.5
    assert "top-1 accuracy" in (out / "summary.md").read_text()
    with Image.open(out / "confusion.png") as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_flickr8k_retrieval_end_to_end_via_cli(tmp_path):
    captions = shared_path("flickr8k-1k", "captions.csv")
    out = tmp_path / "out"
    args = ["eval", "retrieval", "--model", "test-tiny", "--random-init", "--dataset", "captions-csv", "--data",
            str(captions), "-O", "limit=50", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert res["num_images"] == 50 and res["num_texts"] == 250
    for d in ("image_to_text", "text_to_image"):
        r1, r5, r10 = (m[d][f"R@{k}"] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 <= 1
        assert r10 < 0.6  # chance: 0.186 (image->text, 5 captions of 250) and 0.2 (text->image)
    assert m["chance"]["text_to_image"]["R@10"] == pytest.approx(0.2)
    assert "R@1" in (out / "summary.md").read_text()
    # the same run again reads everything from the cache
    r = CliRunner().invoke(main, ["eval", "clipscore", *args[2:], "--json"])
    assert r.exit_code == 0, r.output
    cs = json.loads(r.output[r.output.index("{"):])
    assert cs["cache"]["image"]["encoded"] == 0 and cs["cache"]["text"]["encoded"] == 0
    assert 0 <= cs["metrics"]["clipscore"] <= 2.5 and cs["metrics"]["refclipscore_captions"] == 250


def test_cli_lists_datasets_and_reports_errors_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["eval", "datasets", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["captions-csv"]["kind"] == "captions"
    r = CliRunner().invoke(main, ["eval", "zeroshot", "--model", "test-tiny", "--random-init", "--dataset", "nope",
                                  "--no-cache", "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "nope" in r.output


def test_trained_shapes_model_classifies_synthetic_colours():
    if "shapes-tiny" not in cliplab.list_pretrained():
        pytest.skip("no trained 'shapes-tiny' model is shipped yet (cliplab.list_pretrained())")
    model = cliplab.load("shapes-tiny")
    res = evaluate("zeroshot", model, "synthetic-zeroshot", dataset_options={"kind": "colour", "n_per_class": 10},
                   cache_dir=None)
    assert res["metrics"]["top1"] > 0.9


# --- class names: ImageNet-id folders, duplicates; the sparse confusion matrix ----------------------------------------
IMAGENET_IDS = ["n01440764", "n01443537", "n01484850"]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark"]


def _id_tree(root):
    for k, wnid in enumerate(IMAGENET_IDS):
        (root / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), ("red", "green", "blue")[k]).save(root / wnid / f"{wnid}_{i}.JPEG.png")
    return root


def test_zeroshot_on_imagenet_id_folders_uses_names_given_in_folder_order(tmp_path):
    root = _id_tree(tmp_path / "val")
    base = ["eval", "zeroshot", "-m", "test-tiny", "--random-init", "--dataset", "image-folder", "--data", str(root),
            "--no-cache",
            "--no-progress", "--templates", "single", "-o"]
    # no names: a one-line error saying how to give them, not a run on "a photo of a n01440764."
    r = CliRunner().invoke(main, [*base, str(tmp_path / "a")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error:")
    assert "n01440764" in r.output and "--set classnames=" in r.output and not (tmp_path / "a").exists()
    # a template file that lists the classes in folder order (like CLIP's imagenet JSON)
    (tmp_path / "imagenet.json").write_text(json.dumps({"templates": ["a photo of a {}."],
                                                        "classes": IMAGENET_NAMES}))
    r = CliRunner().invoke(main, [*base[:-3], "--templates", str(tmp_path / "imagenet.json"), "-o",
                                  str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["classnames"] == IMAGENET_NAMES and any("folder order" in n for n in res["notes"])
    # a plain name list as the dataset option (a .txt, one name per line)
    (tmp_path / "names.txt").write_text("\n".join(IMAGENET_NAMES) + "\n")
    r = CliRunner().invoke(main, [*base, str(tmp_path / "c"), "--set", f"classnames={tmp_path / 'names.txt'}",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["classnames"] == IMAGENET_NAMES
    # a list of the wrong length cannot be aligned: an error, not a silent fallback to the ids
    (tmp_path / "short.json").write_text(json.dumps({"templates": ["a {}."], "classes": IMAGENET_NAMES[:2]}))
    r = CliRunner().invoke(main, [*base[:-3], "--templates", str(tmp_path / "short.json"), "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "2 class names" in r.output and "3 class folders" in r.output


def test_duplicate_class_names_are_warned_about_with_their_indices(tmp_path):
    names = ["missile", "tench", "sunglasses", "sunglasses", "Missile"]
    text = {f"a {n}": e(k, 8) for k, n in enumerate(names)}
    model = OracleModel({i: e(i % 5, 8) for i in range(5)}, text)
    data = ClassificationData("o", names, [ImageItem(f"o:{i}", i) for i in range(5)], list(range(5)))
    with pytest.warns(UserWarning, match=r"duplicate class names: 'missile' \(0, 4\), 'sunglasses' \(2, 3\)"):
        res = evaluate("zeroshot", model, data, model_id="m", cache_dir=None, templates=["a {}"])
    assert res["duplicate_classnames"] == {"missile": [0, 4], "sunglasses": [2, 3]}
    assert any("duplicate class names" in n for n in res["notes"])


def test_large_confusion_matrix_is_stored_sparsely(tmp_path):
    c, n = 60, 180
    names = [f"class{k}" for k in range(c)]
    text = {f"a {nm}": e(k, c) for k, nm in enumerate(names)}
    labels = [i % c for i in range(n)]
    preds = [y if i % 3 else (y + 1) % c for i, y in enumerate(labels)]  # every third image goes to the next class
    model = OracleModel({i: e(p, c) for i, p in enumerate(preds)}, text)
    data = ClassificationData("o", names, [ImageItem(f"o:{i}", i) for i in range(n)], labels)
    res = evaluate("zeroshot", model, data, model_id="m", cache_dir=None, templates=["a {}"], out_dir=tmp_path)
    m = res["metrics"]
    assert "confusion_matrix" not in m
    cells = m["confusion"]["cells"]
    assert m["confusion"]["num_classes"] == c and m["confusion"]["format"] == "sparse"
    expected = {}
    for y, p in zip(labels, preds):
        expected[(y, p)] = expected.get((y, p), 0) + 1
    assert {(t, p): k for t, p, k in cells} == expected and all(k > 0 for _, _, k in cells)
    from cliplab.eval.metrics import dense_confusion

    dense = dense_confusion(m)
    assert dense.shape == (c, c) and int(dense.sum()) == n and int(dense.trace()) == 120
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["confusion"] == json.loads(json.dumps(m["confusion"]))
    assert (tmp_path / "results.json").stat().st_size < 30_000
    with Image.open(tmp_path / "confusion.png") as im:
        assert im.format == "PNG"
    assert "most confused" in (tmp_path / "summary.md").read_text()
    # small runs keep the dense matrix (and dense_confusion reads both)
    small = compute_metrics("zeroshot", logits=torch.eye(3), labels=torch.tensor([0, 1, 1]))
    assert small["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert dense_confusion(small).tolist() == small["confusion_matrix"]
