"""The Ray Data engine: decode tasks -> one embedding actor, results regrouped into shards on the driver.

It produces the same rows (and rejects) as the local engine: the items, shard boundaries, preprocessing, model
and tokenizer are the same; only batch composition differs, so embeddings agree to floating-point tolerance.
Ray is started locally (``ray.init(num_cpus=workers)``) unless a cluster is already connected, and shut down
again if this engine started it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..context import JobContext

__all__ = ["run_ray", "ray_available", "EngineUnavailable"]


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here (Ray is not installed or does not start)."""


def ray_available() -> tuple[bool, str]:
    """``(True, version)`` or ``(False, why)``."""
    try:
        import ray
        import ray.data  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"ray[data] is not importable ({type(e).__name__}: {e}); pip install 'ray[data]'"
    return True, ray.__version__


def _model_blob(model) -> dict[str, Any]:
    return {"config": model.config.to_dict(),
            "state": {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()},
            "dtype": str(model.dtype).replace("torch.", "")}


def _decode_batch(batch: dict[str, np.ndarray], source, preprocess: dict, size: int) -> dict[str, np.ndarray]:
    from ...models.preprocess import PreprocessConfig, Preprocessor
    from ..sources import Item
    from .local import decode_one

    settings = dict(preprocess)
    fast = bool(settings.pop("fast", False))  # the bf16 mode decodes large JPEGs at reduced size, as locally
    pre = Preprocessor(PreprocessConfig.from_dict(settings), fast=fast)
    n = len(batch["index"])
    pixels = np.zeros((n, 3, size, size), dtype=np.float32)
    errors = np.empty(n, dtype=object)
    for r in range(n):
        errors[r] = ""
        if not batch["need_image"][r]:
            continue
        key = int(batch["key"][r])
        item = Item(int(batch["index"][r]), str(batch["id"][r]), batch["path"][r] or None, None,
                    None if key < 0 else key)
        arr, reason = decode_one(source, pre, item)
        if arr is None:
            errors[r] = reason
        else:
            pixels[r] = arr
    return {**batch, "pixels": pixels, "image_error": errors}


class _Embedder:
    def __init__(self, blob: dict[str, Any], normalize: bool, device: str):
        import torch

        from ...models import CLIP, ModelConfig

        model = CLIP(ModelConfig.from_dict(blob["config"]))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in blob["state"].items()})
        self.model = model.to(device=device, dtype=getattr(torch, blob["dtype"])).eval()
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ..sources import Item
        from .local import tokenize_items

        model = self.model
        n = len(batch["index"])
        dim = model.config.embed_dim
        img = np.zeros((n, dim), np.float32)
        txt = np.zeros((n, dim), np.float32)
        trunc = np.zeros(n, bool)
        dropped = np.zeros(n, np.int64)
        text_err = np.array([""] * n, dtype=object)
        rows = [r for r in range(n) if batch["need_image"][r] and not batch["image_error"][r]]
        with torch.inference_mode():
            if rows:
                x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows])).to(model.device, model.dtype)
                img[rows] = model.encode_image(x, normalize=self.normalize).float().cpu().numpy()
            trows = [r for r in range(n) if batch["need_text"][r]]
            if trows:
                items = [Item(r, "", None, str(batch["caption"][r])) for r in trows]
                ok, tb, failed = tokenize_items(model, items)
                for it, reason in failed:
                    text_err[it.index] = reason
                if ok:
                    okr = [it.index for it in ok]
                    txt[okr] = model.encode_text(tb, normalize=self.normalize).float().cpu().numpy()
                    trunc[okr] = tb.truncated.numpy()
                    dropped[okr] = tb.n_dropped.numpy()
        return {"index": batch["index"], "shard": batch["shard"], "need_image": batch["need_image"],
                "need_text": batch["need_text"], "image_error": batch["image_error"], "text_error": text_err,
                "image_embedding": img, "text_embedding": txt, "truncated": trunc, "dropped": dropped}


def run_ray(ctx: "JobContext", pending: list[int]) -> None:
    if getattr(ctx.model, "embedder", None) is not None:  # its workers rebuild a plain CLIP from the weights blob
        raise EngineUnavailable("the ray engine cannot carry an LLM text tower yet (LLM2CLIP/ProCLIP models): use "
                                "--engine local")
    ok, why = ray_available()
    if not ok:
        raise EngineUnavailable(why)
    import ray
    import ray.data

    opts = ctx.options
    started = False
    if not ray.is_initialized():
        try:
            ray.init(num_cpus=opts.workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=True)
        except Exception as e:
            raise EngineUnavailable(f"ray could not start a local cluster ({type(e).__name__}: {e})") from e
        started = True
    for name in ("ray", "ray.data"):  # Ray Data logs its plans and (disabled) progress bars at INFO/WARNING
        logging.getLogger(name).setLevel(logging.ERROR)
    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = False
    if hasattr(dctx, "print_on_execution_start"):
        dctx.print_on_execution_start = False
    try:
        builders = {k: ctx.builder(k) for k in pending}
        rows = []
        for k, b in list(builders.items()):
            if b.complete:  # every item rejected while listing
                ctx.commit(b)
                del builders[k]
                continue
            for it in b.items:
                if it.index in b.outstanding:
                    rows.append({"index": it.index, "shard": k, "id": it.id, "path": it.path or "",
                                 "caption": it.caption or "", "key": -1 if it.key is None else int(it.key),
                                 "need_image": ctx.needs_image(it), "need_text": ctx.needs_text(it)})
        if not rows:
            return
        size = ctx.model.config.preprocess.image_size
        chunk = max(1, min(16, opts.batch_size))
        gpu = 1 if str(opts.device).startswith("cuda") else 0
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // chunk, 4 * opts.workers)))
        # decode tasks ask for half a CPU: besides letting two run per core, the differing resources keep Ray from
        # fusing them into the embedding actor (decoding must overlap model compute, not run inside it)
        ds = ds.map_batches(_decode_batch, batch_size=chunk, batch_format="numpy", num_cpus=0.5,
                            fn_kwargs={"source": ctx.source, "size": size,
                                       "preprocess": {**ctx.model.config.to_dict()["preprocess"],
                                                      "fast": ctx.model.precision != "fp32"}})
        try:
            pool = {"compute": ray.data.ActorPoolStrategy(size=1)}
        except (AttributeError, TypeError):  # pragma: no cover - older Ray
            pool = {"concurrency": 1}
        ds = ds.map_batches(_Embedder, batch_size=opts.batch_size, batch_format="numpy", **pool,
                            num_cpus=1, num_gpus=gpu,
                            fn_constructor_kwargs={"blob": _model_blob(ctx.model), "normalize": opts.normalize,
                                                   "device": opts.device})
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            touched = set()
            done = 0
            for r in range(len(batch["index"])):
                idx, k = int(batch["index"][r]), int(batch["shard"][r])
                b = builders[k]
                touched.add(k)
                if batch["need_image"][r]:
                    err = batch["image_error"][r]
                    done += b.image_failed(idx, err) if err else b.image_ok(idx, batch["image_embedding"][r])
                if batch["need_text"][r]:
                    err = batch["text_error"][r]
                    done += (b.text_failed(idx, err) if err else
                             b.text_ok(idx, batch["text_embedding"][r], bool(batch["truncated"][r]),
                                       int(batch["dropped"][r])))
            ctx.advance(done)
            for k in sorted(touched):
                if builders[k].complete:
                    ctx.commit(builders.pop(k))
        if builders:  # pragma: no cover - would be a bug in the pipeline above
            raise RuntimeError(f"ray engine finished with incomplete shards {sorted(builders)}")
    finally:
        if started:
            ray.shutdown()
