"""SCE (Dissecting CLIP): closed forms of the Schur decomposition, invariances, the correction, keyword pass-through,
and the effect on the shipped model (images with prompt-independent colour hold more beyond their text)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import cliplab
from cliplab.metrics import sce as sce_mod
from cliplab.metrics.sce import (correct, correction_map, entropy_score, kernel_features, rff_features,
                                 schur_complement_entropy, schur_decomposition, sce_of_embeddings)
from conftest import REPO

f64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _with_moments(z: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Rows ``z`` recoloured so that ``z^T z / n`` equals ``second_moment`` exactly."""
    n = z.shape[0]
    m = z.T @ z / n
    w = torch.linalg.cholesky(m)
    c = torch.linalg.cholesky(second_moment)
    return z @ torch.linalg.inv(w).T @ c.T


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=f64))
    return q


# --- exact properties --------------------------------------------------------------------------------------------
def test_entropy_score_closed_forms():
    # raw eigenvalue weights (the official code) vs the normalised Vendi form
    assert entropy_score(torch.diag(torch.tensor([0.5, 0.5], dtype=f64))) == pytest.approx(2.0, abs=1e-9)
    assert entropy_score(torch.diag(torch.tensor([0.25, 0.25], dtype=f64))) == pytest.approx(math.sqrt(2), abs=1e-8)
    assert entropy_score(torch.diag(torch.tensor([0.25, 0.25], dtype=f64)), normalized=True) == pytest.approx(2.0)
    lam = torch.tensor([0.6, 0.3, 0.1], dtype=f64)
    q = _orthogonal(3, 1)
    expected = math.exp(-float((lam * torch.log(lam)).sum()))
    assert entropy_score(q @ torch.diag(lam) @ q.T) == pytest.approx(expected, rel=1e-10)
    assert entropy_score(torch.zeros(4, 4, dtype=f64)) == pytest.approx(1.0, abs=1e-8)  # S = 0 is the minimum 1


def test_schur_complement_equals_the_gaussian_closed_form():
    """Samples with exactly known second moments: S and the explained part are the textbook block formulas."""
    dx, dy, n = 3, 2, 500
    a = torch.randn(dx + dy, dx + dy, generator=_gen(2), dtype=f64)
    sigma = a @ a.T + 0.5 * torch.eye(dx + dy, dtype=f64)
    z = _with_moments(torch.randn(n, dx + dy, generator=_gen(3), dtype=f64), sigma)
    x, y = z[:, :dx], z[:, dx:]
    dec = schur_decomposition(x, y, ridge=0.0)
    sxx, syy, sxy = sigma[:dx, :dx], sigma[dx:, dx:], sigma[:dx, dx:]
    expected_schur = syy - sxy.T @ torch.linalg.inv(sxx) @ sxy
    assert torch.allclose(dec.schur, expected_schur, atol=1e-10)
    assert torch.allclose(dec.explained + dec.schur, syy, atol=1e-12)
    assert torch.allclose(dec.gamma, torch.linalg.inv(sxx) @ sxy, atol=1e-10)
    # the Schur complement is the conditional second moment: the inverse of the y-block of sigma^-1
    assert torch.allclose(dec.schur, torch.linalg.inv(torch.linalg.inv(sigma)[dx:, dx:]), atol=1e-9)


def test_noise_only_moves_the_schur_part_and_sce_grows_with_it():
    """y = x A + s e with e exactly uncorrelated with x: S = s^2 C_ee, explained = A^T C_xx A for every s."""
    n, d = 400, 4
    x = torch.randn(n, d, generator=_gen(4), dtype=f64)
    e = torch.randn(n, d, generator=_gen(5), dtype=f64)
    e = e - x @ torch.linalg.lstsq(x, e).solution  # sample-orthogonal to x's columns
    a = torch.randn(d, d, generator=_gen(6), dtype=f64) * 0.3
    sces, text_parts = [], []
    for s in (0.0, 0.05, 0.1, 0.2):
        y = x @ a + s * e
        dec = schur_decomposition(x, y, ridge=0.0)
        assert torch.allclose(dec.schur, s * s * e.T @ e / n, atol=1e-12)
        assert torch.allclose(dec.explained, a.T @ (x.T @ x / n) @ a, atol=1e-12)
        r = schur_complement_entropy(x, y, kernel="linear", normalize=False, ridge=0.0)
        sces.append(r.sce)
        text_parts.append(r.text_part)
    assert sces[0] == pytest.approx(1.0, abs=1e-6)  # noise 0: nothing beyond the text, SCE at its minimum
    assert all(b > a_ for a_, b in zip(sces, sces[1:])), sces
    assert max(text_parts) - min(text_parts) < 1e-9


def test_independent_text_leaves_only_the_mean_explained():
    """x independent of y (centred cross-moment exactly 0): uncentred covariances give
    S = C_yy - (mu_x^T C_xx^-1 mu_x) mu_y mu_y^T; with zero means S = C_yy exactly."""
    n = 600
    x = torch.randn(n, 3, generator=_gen(7), dtype=f64) + torch.tensor([1.0, -0.5, 0.2], dtype=f64)
    y = torch.randn(n, 2, generator=_gen(8), dtype=f64)
    xc = x - x.mean(0)
    y = y - y.mean(0)
    y = y - xc @ torch.linalg.lstsq(xc, y).solution + torch.tensor([0.7, 0.3], dtype=f64)  # centred cross = 0
    dec = schur_decomposition(x, y, ridge=0.0)
    mx, my = x.mean(0), y.mean(0)
    c = float(mx @ torch.linalg.inv(x.T @ x / n) @ mx)
    assert torch.allclose(dec.schur, y.T @ y / n - c * torch.outer(my, my), atol=1e-10)
    y0 = y - my
    x0 = x - mx
    assert torch.allclose(schur_decomposition(x0, y0, ridge=0.0).schur, y0.T @ y0 / n, atol=1e-10)


def test_scores_are_invariant_under_orthogonal_maps():
    n, d = 300, 6
    x = torch.randn(n, d, generator=_gen(9), dtype=f64)
    y = x @ torch.randn(d, d, generator=_gen(10), dtype=f64) * 0.5 + torch.randn(n, d, generator=_gen(11), dtype=f64)
    qx, qy = _orthogonal(d, 12), _orthogonal(d, 13)
    for kernel, (tx, ty) in {"linear": (qx, qy), "gaussian": (qx, qx)}.items():  # the Gaussian kernel: one map
        a = schur_complement_entropy(x[:120], y[:120], kernel=kernel, ridge=1e-6).as_dict()
        b = schur_complement_entropy(x[:120] @ tx, y[:120] @ ty, kernel=kernel, ridge=1e-6).as_dict()
        for key in ("sce", "text_part", "image_total", "text_total"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (kernel, key)
    # RFF: rotating the data and counter-rotating the shared frequencies gives the same features exactly
    omega = torch.randn(d, 64, generator=_gen(14), dtype=f64) / 3.5
    fx, fy = rff_features(x, y, omega=omega)
    gx, gy = rff_features(x @ qx, y @ qx, omega=qx.T @ omega)
    assert torch.allclose(fx, gx, atol=1e-12) and torch.allclose(fy, gy, atol=1e-12)


def test_rff_features_share_frequencies_and_approximate_the_kernel():
    x = torch.randn(20, 5, generator=_gen(15), dtype=f64)
    y = torch.randn(20, 5, generator=_gen(16), dtype=f64)
    fx, fy = rff_features(x, y, sigma=2.0, rff_dim=20000, seed=0)
    assert torch.allclose(fx.norm(dim=1), torch.ones(20, dtype=f64))  # |phi| = 1, so tr C = 1
    exact = torch.exp(-torch.cdist(x, y).pow(2) / (2 * 2.0 ** 2))
    assert (fx @ fy.T - exact).abs().max() < 0.05  # shared W: the cross inner products are the kernel too
    gx, gy = kernel_features(x, y, kernel="gaussian", sigma=2.0)
    assert torch.allclose(gx @ gy.T, exact, atol=1e-8)


def test_correction_removes_the_cross_covariance_and_psd():
    n = 400
    x = torch.randn(n, 5, generator=_gen(17), dtype=f64)
    y = x @ torch.randn(5, 4, generator=_gen(18), dtype=f64) + 0.3 * torch.randn(n, 4, generator=_gen(19), dtype=f64)
    gamma = correction_map(x, y)
    y_corr = correct(x, y, gamma)
    assert (x.T @ y_corr / n).abs().max() < 1e-10
    assert (x.T @ y / n).abs().max() > 0.1
    fx, fy = kernel_features(x[:, :4], y, kernel="rff", rff_dim=100)
    dec = schur_decomposition(fx, fy)
    # PSD up to the pseudo-inverse's round-off on a near-singular C_xx (trace 1; eigenvalues are clamped at 1e-10);
    # the round-off reaches -1.07e-6 with another BLAS thread count (CI), so the bound is 1e-5 of the trace
    assert torch.linalg.eigvalsh(dec.schur).min() > -1e-5
    assert torch.linalg.eigvalsh(dec.explained).min() > -1e-5


# --- keyword pass-through ----------------------------------------------------------------------------------------
def test_every_keyword_reaches_the_core(monkeypatch):
    seen = {}
    real_features, real_dec, real_entropy = sce_mod.kernel_features, sce_mod.schur_decomposition, sce_mod.entropy_score

    def features(x, y, **kw):
        seen["features"] = kw
        seen["norm"] = float(torch.as_tensor(x).norm(dim=1).max())
        return real_features(x, y, **kw)

    def dec(px, py, **kw):
        seen["dec"] = kw
        return real_dec(px, py, **kw)

    def entropy(m, **kw):
        seen.setdefault("entropy", []).append(kw)
        return real_entropy(m, **kw)

    monkeypatch.setattr(sce_mod, "kernel_features", features)
    monkeypatch.setattr(sce_mod, "schur_decomposition", dec)
    monkeypatch.setattr(sce_mod, "entropy_score", entropy)
    x = 3 * torch.randn(100, 4, generator=_gen(20), dtype=f64)
    y = torch.randn(100, 4, generator=_gen(21), dtype=f64)
    r = schur_complement_entropy(x, y, kernel="rff", sigma=1.7, rff_dim=33, seed=5, normalized=True, ridge=1e-7,
                                 normalize=False, keep_decomposition=True)
    assert seen["features"] == {"kernel": "rff", "sigma": 1.7, "rff_dim": 33, "seed": 5}
    assert seen["dec"] == {"ridge": 1e-7}
    assert all(kw == {"normalized": True} for kw in seen["entropy"]) and len(seen["entropy"]) == 4
    assert seen["norm"] > 2 and r.decomposition is not None and r.decomposition.c_xx.shape == (66, 66)
    schur_complement_entropy(x, y, kernel="linear")
    assert seen["norm"] == pytest.approx(1.0)  # normalize=True by default

    # sce_of_embeddings and the eval task hand every option on
    calls = []
    monkeypatch.setattr(sce_mod, "schur_complement_entropy", lambda t, i, **kw: calls.append(kw) or r)

    class Job:
        text, image = x, y
        text_valid = [True] * 99 + [False]
        image_valid = [True] * 100

    sce_of_embeddings(Job(), kernel="cosine", seed=3)
    assert calls[-1] == {"kernel": "cosine", "seed": 3}

    class Data:
        items, captions, caption_image = ["a", "b"], ["c0", "c1", "c2"], [0, 1, 1]

    class Encoder:
        def images(self, items):
            return torch.randn(len(items), 4, generator=_gen(1))

        def texts(self, caps):
            return torch.randn(len(caps), 4, generator=_gen(2))

    opts = dict(kernel="linear", sigma=2.5, rff_dim=7, seed=9, normalized=True, ridge=1e-3, normalize=False)
    sce_mod.sce_task(Data(), Encoder(), **opts)
    assert calls[-2] == opts and calls[-1] == opts  # the pairs and the shuffled control


# --- effect on the shipped model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_tiny():
    if "shapes-tiny" not in cliplab.list_pretrained():
        pytest.skip("the shipped shapes-tiny model is not installed")
    return cliplab.load("shapes-tiny").eval()


@torch.no_grad()
def _encode_images(model, scenes):
    return torch.cat([model.encode_image(model.preprocessor.batch([s.render() for s in scenes[i: i + 100]]))
                      for i in range(0, len(scenes), 100)])


def test_effect_random_colour_generator_has_higher_sce(shapes_tiny):
    """Generator A draws a random colour per image, generator B one fixed colour per prompt; same prompts ("a photo
    of a {shape}"), same layouts. The colour is beyond the text only for A, so SCE(A) > SCE(B)."""
    from cliplab.data.synthetic import SceneWorld

    model = shapes_tiny
    world = SceneWorld(image_size=64, seed=0, min_objects=1, max_objects=1, clutter_prob=0, word_prob=0)
    scenes = [world.sample(i) for i in range(200)]
    fixed: dict = {}
    same_colour = [s.replace(objects=(s.objects[0].with_attrs(64, colour=fixed.setdefault(
        s.objects[0].shape, world.colours[len(fixed) % len(world.colours)])),)) for s in scenes]
    with torch.no_grad():
        text = model.encode_texts([f"a photo of a {s.objects[0].shape}" for s in scenes])
    img_a, img_b = _encode_images(model, scenes), _encode_images(model, same_colour)
    for kernel, opts in (("rff", {"rff_dim": 50}), ("linear", {})):
        a = schur_complement_entropy(text, img_a, kernel=kernel, **opts)
        b = schur_complement_entropy(text, img_b, kernel=kernel, **opts)
        assert a.sce > b.sce * (1.03 if kernel == "rff" else 1.3), (kernel, a.sce, b.sce)
        assert a.image_total > b.image_total
    # the control: the same images with the pairing shuffled leave more unexplained than the true pairing
    perm = torch.randperm(200, generator=_gen(0))
    assert schur_complement_entropy(text[perm], img_b, kernel="linear").sce > 1.5 * b.sce


def test_eval_task_runs_on_the_synthetic_captions(shapes_tiny, tmp_path):
    from cliplab.eval import evaluate

    res = evaluate("sce", shapes_tiny, "synthetic-retrieval", dataset_options={"n": 80}, cache_dir=None,
                   rff_dim=15)
    m = res["metrics"]
    assert res["task"] == "sce" and m["n"] == res["num_texts"] and m["kernel"] == "rff"
    assert 1.0 <= m["sce"] <= m["image_total"] and m["shuffled_sce"] > m["sce"]


def test_degenerate_sizes_warn():
    x = torch.randn(30, 4, generator=_gen(22), dtype=f64)
    y = torch.randn(30, 4, generator=_gen(23), dtype=f64)
    with pytest.warns(sce_mod.SCEDegenerateWarning):
        r = schur_complement_entropy(x, y, kernel="rff", rff_dim=50)
    assert r.sce == pytest.approx(1.0, abs=1e-4)  # 100 features for 30 pairs fit any image exactly


def test_doc_example_runs():
    page = (REPO / "docs/methods/sce.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/methods/sce.md", "exec"), namespace)
    assert namespace["result"].sce >= 1.0
