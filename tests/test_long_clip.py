"""Long-CLIP: exact properties of the positional stretching (KPS), the frozen split, and the PCA coarse features."""

from __future__ import annotations

import pytest
import torch

import cliplab
from cliplab.longtext.long_clip import (freeze_kept_positions, pca_coarse, stretch_positions, stretched_length,
                                        to_long_clip)
from conftest import randomize_


def _table(n=77, w=64, seed=0):
    return torch.randn(n, w, generator=torch.Generator().manual_seed(seed))


def _official_kps(p: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Brute-force loop with the official code's expressions (factor 4), written out term by term."""
    length, dim = p.shape
    new = torch.zeros(4 * length - 3 * keep, dim, dtype=p.dtype)
    for i in range(keep):
        new[i] = p[i]
    for i in range(length - 1 - keep):
        new[4 * i + keep] = p[i + keep]
        new[4 * i + 1 + keep] = 3 * p[i + keep] / 4 + 1 * p[i + 1 + keep] / 4
        new[4 * i + 2 + keep] = 2 * p[i + keep] / 4 + 2 * p[i + 1 + keep] / 4
        new[4 * i + 3 + keep] = 1 * p[i + keep] / 4 + 3 * p[i + 1 + keep] / 4
    for j in range(4):
        new[4 * length - 3 * keep - 4 + j] = p[length - 1] + j * (p[length - 1] - p[length - 2]) / 4
    return new


@pytest.fixture(scope="module")
def model():
    return randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()


# --- KPS ------------------------------------------------------------------------------------------------------------
def test_stretch_length_and_kept_rows():
    p = _table()
    new = stretch_positions(p)
    assert new.shape == (248, 64) and stretched_length(77) == 248
    assert torch.equal(new[:20], p[:20])  # bit-equal
    for i in range(77 - 20):  # row 20 + 4i is the old row 20 + i (i = 56: the tail's first row, P[76])
        assert torch.equal(new[20 + 4 * i], p[20 + i]), i
    assert new.dtype == p.dtype and not new.requires_grad


def test_stretch_midpoints_and_tail_follow_the_formula():
    p = _table()
    new = stretch_positions(p)
    assert torch.equal(new, _official_kps(p))  # the official expressions, bit for bit
    for i in range(77 - 1 - 20):
        a, b = p[20 + i], p[21 + i]
        assert torch.equal(new[20 + 4 * i + 2], (a + b) / 2)  # the midpoint, exactly
        pd = p.double()
        for j in (1, 3):  # quarter points: the linear interpolation up to float32 rounding
            ref = ((4 - j) * pd[20 + i] + j * pd[21 + i]) / 4
            assert torch.allclose(new[20 + 4 * i + j].double(), ref, atol=1e-6, rtol=0)
    last, before = p[76], p[75]
    for j in range(4):
        assert torch.equal(new[244 + j], last + j * (last - before) / 4)


def test_stretch_generalises_and_factor_one_is_identity():
    p = _table(n=30, w=8, seed=3)
    assert torch.equal(stretch_positions(p, keep=5, factor=1), p)
    out = stretch_positions(p, keep=5, factor=3)
    assert out.shape[0] == 3 * 30 - 2 * 5 and torch.equal(out[5 + 3 * 7], p[5 + 7])
    with pytest.raises(ValueError):
        stretch_positions(p, keep=30)
    with pytest.raises(ValueError):
        stretch_positions(p, factor=0)


# --- the model ------------------------------------------------------------------------------------------------------
def test_to_long_clip_keeps_short_texts_bit_identical(model):
    import copy

    long = to_long_clip(copy.deepcopy(model))
    assert long.config.text.context_length == 248 and long.text.pos_embed.shape == (248, 64)
    assert model.config.text.context_length == 77  # the original is untouched
    texts = ["a dog", "a red circle left of a blue square", "two small green stars above a big yellow triangle"]
    b77, b248 = model.tokenize(texts), long.tokenize(texts)
    assert int(b77.lengths.max()) < 20 and b248.ids.shape[1] == 248
    with torch.no_grad():
        assert torch.equal(long.encode_text(b248), model.encode_text(b77))
        assert torch.equal(long.encode_text(b248, output=True).pooled, model.encode_text(b77))


def test_long_model_encodes_200_tokens_without_truncation(model):
    import copy

    long = to_long_clip(copy.deepcopy(model))
    words = " ".join(["dog", "cat", "red", "blue"] * 50)  # 200 one-token words
    batch = long.tokenize([words], truncate=False)
    n = int(batch.lengths[0])
    assert n == 202 and not bool(batch.truncated[0])
    with pytest.raises(Exception):
        model.tokenize([words], truncate=False)  # the 77-token model refuses it
    changed = batch.ids.clone()
    changed[0, n - 3] = changed[0, 5]  # a token near position 200
    with torch.no_grad():
        a, b = long.encode_text(batch.ids), long.encode_text(changed)
    assert torch.isfinite(a).all() and not torch.equal(a, b)  # the late token is read


def test_save_load_round_trip_keeps_248(model, tmp_path):
    import copy

    long = to_long_clip(copy.deepcopy(model))
    long.save(tmp_path / "long")
    back = cliplab.load(tmp_path / "long")
    assert back.config.text.context_length == 248 and back.tokenizer.context_length == 248
    assert torch.equal(back.text.pos_embed, long.text.pos_embed)
    batch = back.tokenize(["a caption " * 40])
    with torch.no_grad():  # the weights are bit-equal; features only to float rounding, because cliplab.load
        # leaves tensors in memory that is not 64-byte aligned (safetensors), which changes the CPU kernels' paths
        assert torch.allclose(back.encode_text(batch), long.encode_text(batch), atol=1e-5, rtol=0)


def test_works_on_a_loaded_checkpoint(model, tmp_path):
    model.save(tmp_path / "base")
    loaded = to_long_clip(cliplab.load(tmp_path / "base"))
    assert torch.equal(loaded.text.pos_embed, stretch_positions(model.text.pos_embed))


# --- the trainable split ----------------------------------------------------------------------------------------------
def _one_step(long, opt):
    batch = long.tokenize(["a very long caption about shapes " * 12])
    assert int(batch.lengths[0]) > 40
    opt.zero_grad()
    long.encode_text(batch).pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),  # the paper's optimizer (decoupled decay)
    lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.1),
])
def test_frozen_rows_are_bit_identical_after_steps(model, make_opt):
    import copy

    long = to_long_clip(copy.deepcopy(model)).train()
    before = long.text.pos_embed.detach().clone()
    opt = make_opt(long.parameters())
    handle = freeze_kept_positions(long, keep=20, optimizer=opt)
    for _ in range(2):
        _one_step(long, opt)
    after = long.text.pos_embed.detach()
    assert torch.equal(after[:20], before[:20])
    assert not torch.equal(after[20:], before[20:])  # the rest trains
    assert torch.equal(long.text.pos_embed.grad[:20], torch.zeros_like(before[:20]))
    handle.remove()
    _one_step(long, opt)
    assert not torch.equal(long.text.pos_embed.detach()[:20], before[:20])  # unfrozen again


def test_gradient_hook_alone_does_not_survive_weight_decay(model):
    """Why the optimizer hook exists: AdamW's decoupled decay moves rows whose gradient is zero."""
    import copy

    long = to_long_clip(copy.deepcopy(model)).train()
    before = long.text.pos_embed.detach().clone()
    opt = torch.optim.AdamW(long.parameters(), lr=1e-2, weight_decay=0.1)
    freeze_kept_positions(long, keep=20)  # gradient hook only
    _one_step(long, opt)
    assert torch.equal(long.text.pos_embed.grad[:20], torch.zeros_like(before[:20]))
    assert not torch.equal(long.text.pos_embed.detach()[:20], before[:20])
    with pytest.raises(ValueError):
        freeze_kept_positions(long, keep=20, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# --- PCM ------------------------------------------------------------------------------------------------------------
def test_pca_coarse_rank_and_mean():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    out = pca_coarse(x, rank=8)
    xn = torch.nn.functional.normalize(x, dim=-1)
    centred = out.double() - out.double().mean(0)
    assert torch.linalg.matrix_rank(centred, atol=1e-5).item() <= 8
    assert torch.allclose(out.mean(0), xn.mean(0), atol=1e-6)  # the mean is added back
    # parity with the official eigen-decomposition route (top eigenvectors of Xc^T Xc)
    xc = xn.double() - xn.double().mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    top = evecs[:, evals.argsort(descending=True)[:8]]
    ref = xc @ top @ top.T + xn.double().mean(0)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert out.dtype == x.dtype and pca_coarse(x, rank=8).shape == x.shape


def test_pca_coarse_is_identity_on_low_rank_inputs():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(48, 5, generator=g))[0]  # unit rows in a 5-dim subspace: centred rank <= 5
    x = torch.nn.functional.normalize(torch.randn(40, 5, generator=g) @ basis.T, dim=-1)
    assert torch.allclose(pca_coarse(x, rank=32), x, atol=1e-6)
    assert torch.allclose(pca_coarse(x, rank=5), x, atol=1e-6)
    assert not torch.allclose(pca_coarse(x, rank=2), x, atol=1e-3)  # fewer components than the data has: lossy
    full = torch.randn(10, 6, generator=g)
    assert torch.allclose(pca_coarse(full, rank=0), torch.nn.functional.normalize(full, dim=-1).mean(0).expand(10, 6),
                          atol=1e-6)


def test_pca_coarse_is_differentiable():
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    pca_coarse(x, rank=4).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- keyword pass-through (the audit: both of these bugs passed every test above) -----------------------------------
def test_to_long_clip_passes_keep_and_factor(model):
    import copy

    long = to_long_clip(copy.deepcopy(model), keep=10, factor=3)
    assert long.text.pos_embed.shape[0] == stretched_length(77, keep=10, factor=3) == 3 * 77 - 2 * 10
    assert long.config.text.context_length == 211
    assert torch.equal(long.text.pos_embed.detach(), stretch_positions(model.text.pos_embed, keep=10, factor=3))
    assert not torch.equal(long.text.pos_embed[:20].detach(), stretch_positions(model.text.pos_embed)[:20])


@pytest.mark.parametrize("keep", [7, 33])
def test_freeze_kept_positions_uses_its_keep(model, keep):
    import copy

    long = to_long_clip(copy.deepcopy(model)).train()
    before = long.text.pos_embed.detach().clone()
    opt = torch.optim.AdamW(long.parameters(), lr=1e-2, weight_decay=0.1)
    handle = freeze_kept_positions(long, keep=keep, optimizer=opt)
    assert handle.keep == keep
    _one_step(long, opt)
    after = long.text.pos_embed.detach()
    assert torch.equal(after[:keep], before[:keep])
    # the rows right after `keep` (inside the module's 20 when keep=7) do train: the text is > 40 tokens long
    assert not torch.equal(after[keep: keep + 5], before[keep: keep + 5])
    assert torch.equal(long.text.pos_embed.grad[:keep], torch.zeros_like(before[:keep]))
    assert long.text.pos_embed.grad[keep: keep + 5].abs().sum() > 0
