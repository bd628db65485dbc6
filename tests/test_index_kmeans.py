"""Two-level k-means for the IVF coarse quantiser: the rule that picks it, exact properties of the centroids, their
quality against faiss's one-level k-means and against a control, and indexes trained with it (behind an OPQ
rotation too) finding the same neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.index import Index
from cliplab.index.kmeans import two_level_centroids
from cliplab.index.sizing import TWO_LEVEL_MIN_NLIST, default_nlist, plan_index

from conftest import brute_top, clustered, recall

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")


def test_the_rule_picks_two_levels_from_many_lists():
    below, above = plan_index(250_000, 512), plan_index(300_000, 512)  # 2000 and 2191 lists
    assert below.nlist < TWO_LEVEL_MIN_NLIST <= above.nlist
    assert below.kmeans == "one-level" and not any("two levels" in r for r in below.reasons)
    assert above.kmeans == "two-level"
    assert any(r.startswith(f"k-means in two levels ({above.nlist} lists >= {TWO_LEVEL_MIN_NLIST}): 47 groups")
               for r in above.reasons)
    assert plan_index(10_000_000, 512, max_memory="4GB").kmeans == "two-level"
    forced = plan_index(20_000, 64, kind="ivf", kmeans="two-level")
    assert forced.kmeans == "two-level" and any("two levels (as asked)" in r for r in forced.reasons)
    assert plan_index(300_000, 512, kmeans="one-level").kmeans == "one-level"
    assert plan_index(50_000, 512).kmeans is None  # flat: no k-means at all
    with pytest.raises(ValueError, match="kmeans must be one of"):
        plan_index(10, 8, kmeans="three-level")


def _objective(x, c):
    """Mean inner product of each point with its best centroid (what spherical k-means maximises)."""
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(c)
    d, _ = index.search(x, 1)
    return float(d.mean())


@pytest.fixture(scope="module")
def points():
    return clustered(30_000, 32, clusters=200)


def test_two_level_centroids_exact_properties(points):
    c = two_level_centroids(points, 300, seed=3)
    assert c.shape == (300, 32) and c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)  # spherical, as the IVF's own k-means
    np.testing.assert_array_equal(c, two_level_centroids(points, 300, seed=3))  # a seed, one answer
    assert not np.array_equal(c, two_level_centroids(points, 300, seed=4))
    tiny = clustered(40, 8)  # as many centroids as points: every point is one
    got = two_level_centroids(tiny, 40)
    assert got.shape == (40, 8)
    with pytest.raises(ValueError, match="at least as many training points"):
        two_level_centroids(tiny, 41)


def test_each_group_gets_centroids_in_proportion_to_its_points():
    rng = np.random.default_rng(0)
    big, small = np.eye(16, dtype=np.float32)[0], np.eye(16, dtype=np.float32)[1]
    x = np.concatenate([big + 0.05 * rng.standard_normal((9000, 16)), small + 0.05 * rng.standard_normal((1000, 16))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    c = two_level_centroids(x, 20, seed=0)  # 4 groups: the small cluster is one group (or part of one)
    near_small = int(((c @ small) > (c @ big)).sum())
    assert 1 <= near_small <= 3, near_small  # its share is 20 x 10% = 2 (an even split of groups would give it 5)


def test_two_level_centroids_fit_like_one_level_and_far_better_than_a_control(points):
    k = 300
    two = _objective(points, two_level_centroids(points, k, seed=0))
    km = faiss.Kmeans(points.shape[1], k, niter=10, seed=0, spherical=True)
    km.train(points)
    one = _objective(points, km.centroids)
    rng = np.random.default_rng(0)
    control = _objective(points, points[rng.choice(len(points), k, replace=False)])  # k-means' own initialisation
    assert two >= one - 0.01, (two, one)
    assert two - control >= 5 * max(one - two, 0.002), (two, one, control)


@pytest.mark.parametrize("kind,extra", [("ivf", {}), ("ivfpq", {"pq_m": 8, "opq": False}),
                                        ("ivf", {"coarse": "hnsw"})])
def test_an_index_trained_in_two_levels_finds_the_neighbours(kind, extra):
    x, q = clustered(8000, 32, clusters=100), clustered(200, 32, seed=1, clusters=100)
    truth = brute_top(x, q, 10)
    recalls = {}
    for km in ("one-level", "two-level"):
        ix = Index.build(x, kind=kind, nlist=128, kmeans=km, queries=q, recall_target=0.99, **extra)
        ivf = faiss.extract_index_ivf(ix.faiss_index)
        assert ix.info["params"]["kmeans"] == km and ix.info["plan"]["kmeans"] == km and ivf.quantizer.ntotal == 128
        centroids = ivf.quantizer.reconstruct_n(0, 128)
        np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)  # spherical, as faiss's own
        ivf.nprobe = 4
        _, rows = ix.faiss_index.search(q, 10)
        recalls[km] = recall(rows, truth)
    assert recalls["two-level"] >= recalls["one-level"] - 0.05, recalls  # the same recall at the same breadth


def test_behind_a_rotation_the_centroids_live_in_the_rotated_space():
    """What an OPQ build does, with a rotation that trains at once: the IVF sees rotated vectors, so its centroids
    must be found among rotated vectors (centroids of the raw vectors would send queries to the wrong lists)."""
    from cliplab.index.kmeans import train_ivf

    x, q = clustered(8000, 32, clusters=100), clustered(200, 32, seed=1, clusters=100)
    truth = brute_top(x, q, 10)
    recalls = {}
    for two_level in (False, True):
        index = faiss.index_factory(32, "RR32,IVF128,Flat", faiss.METRIC_INNER_PRODUCT)
        train_ivf(index, x, two_level=two_level, seed=0)
        assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 128
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 4
        _, rows = index.search(q, 10)
        recalls[two_level] = recall(rows, truth)
    assert recalls[True] >= recalls[False] - 0.05 and recalls[True] >= 0.6, recalls


def test_default_nlist_crosses_the_threshold_near_a_quarter_million():
    assert default_nlist(262_144) == TWO_LEVEL_MIN_NLIST
