"""The search service without HTTP: an index, the model that made it, micro-batched query encoding, CLIP4DM
explanations and thumbnails. :mod:`cliplab.server.app` puts HTTP around it; tests and other front ends can use it
directly."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
import torch

from ..index import Index, resident_memory_mb
from ..models.tokenizer import TruncationError, TruncationWarning
from .batcher import MicroBatcher
from .images import Thumbnails
from .metrics import Metrics
from .settings import ServeSettings


class RequestError(ValueError):
    """A request the service refuses: ``status`` is the HTTP status (404 unknown id, 422 bad query, 503 busy)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class SearchService:
    """Serve ``index`` (an :class:`~cliplab.index.Index` or the path of one) with ``model`` (default: the model the
    index recorded), under ``settings``."""

    def __init__(self, index: Index | str, model=None, settings: ServeSettings | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings or ServeSettings()
        self.index = Index.load(index) if not isinstance(index, Index) else index
        self.model = model if model is not None else self.index.model()
        if self.model.config.embed_dim != self.index.dim:
            raise ValueError(f"model {self.model.config.name!r} makes {self.model.config.embed_dim}-d vectors, the "
                             f"index holds {self.index.dim}-d ones")
        if self.settings.backend != "torch":  # the same plain API, run by the runtime on the model's ONNX export
            from ..export.backends import load_backend

            self.model = load_backend(self.model, self.settings.backend, self.settings.precision)
        else:
            self.model.eval()
            if self.settings.precision != self.model.precision:
                self.model.set_precision(self.settings.precision)
        self.metrics = metrics or Metrics()
        self.metrics.set_gauge("cliplab_index_vectors", len(self.index))
        md = self.index.metadata
        self._row_of: dict[str, int] = {}
        for r, i in enumerate(md.column("id").to_pylist()):
            self._row_of.setdefault(i, r)  # a repeated id names its first row
        self._has_path = [p is not None for p in md.column("path").to_pylist()]
        self.thumbnails = Thumbnails(md.column("path").to_pylist(), size=self.settings.thumb_size)
        self._explain_lock = threading.Lock()
        s = self.settings
        self.text_batcher = MicroBatcher(self._encode_and_search, max_batch=s.max_batch, wait_ms=s.batch_wait_ms,
                                         name="cliplab-text", on_batch=lambda n: self.metrics.observe_batch("text", n))
        self.image_batcher = MicroBatcher(self._encode_pixels, max_batch=s.max_batch, wait_ms=s.batch_wait_ms,
                                          name="cliplab-image", on_batch=lambda n: self.metrics.observe_batch("image", n))

    def close(self) -> None:
        self.text_batcher.close()
        self.image_batcher.close()

    # --- what the server says about itself --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        from ..export.backends import backend_info

        return {"status": "ok", "model": self.model.config.name, "n": len(self.index), "dim": self.index.dim,
                "field": self.index.info.get("field"), "kind": self.index.kind, **backend_info(self.model),
                "partial": bool(self.index.info.get("partial", False)), "rss_mb": resident_memory_mb(),
                "index_loaded_with": self.index.info.get("loaded_with")}

    # --- encoding (one model call per batch) ------------------------------------------------------------------------
    def _encode_and_search(self, items: list[tuple[str, int]]) -> list[tuple[np.ndarray, list]]:
        """One model call for every text of the batch and one index search for those that search (``k > 0``;
        ``k == 0``: the vector only, for ``/api/embed``): a ``[b, dim]`` search is one matrix product instead of
        ``b`` vector ones."""
        with torch.inference_mode():  # prepare_query cut every text to fit the context: no truncation here
            vecs = self.model.encode_texts([t for t, _ in items], normalize=True).float().cpu().numpy()
        searching = [i for i, (_, k) in enumerate(items) if k > 0]
        hits: list[list] = [[] for _ in items]
        if searching:
            k_max = max(items[i][1] for i in searching)
            found = self.index.search(vecs[searching], k_max)
            for i, row in zip(searching, found):
                hits[i] = row[: items[i][1]]
        return [(v, h) for v, h in zip(vecs, hits)]

    def _encode_pixels(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        with torch.inference_mode():
            batch = torch.stack(pixels).to(self.model.device, self.model.dtype)
            vecs = self.model.encode_image(batch, normalize=True).float().cpu().numpy()
        return list(vecs)

    def _wait(self, batcher: MicroBatcher, item) -> np.ndarray:
        try:
            return batcher(item, timeout=self.settings.timeout_s)
        except TimeoutError:
            raise RequestError(504, f"the model did not answer within {self.settings.timeout_s:g} s "
                                    "(the server is overloaded)") from None

    def _tokenize_quietly(self, text: str):
        """``(batch, truncated)``; the truncation warning is not emitted (the answer's ``warnings`` say it).
        ``warnings.catch_warnings`` changes process-wide state, so it is entered only on the rare long query."""
        try:
            return self.model.tokenize([text], truncate=False), False
        except TruncationError:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncationWarning)
                return self.model.tokenize([text]), True

    def prepare_query(self, text: str) -> tuple[str, list[str]]:
        """The query as it will be encoded, and warnings about what was cut. Empty queries are refused (422). A
        query longer than the model's context is cut after its last token that fits, so the encoder never has to
        truncate (or warn) again."""
        if not isinstance(text, str) or not text.strip():
            raise RequestError(422, "the query is empty")
        text = " ".join(text.split())
        notes = []
        limit = self.settings.max_query_chars
        if len(text) > limit:
            notes.append(f"the query was cut to its first {limit} of {len(text)} characters")
            text = text[:limit]
        batch, truncated = self._tokenize_quietly(text)
        if truncated:
            ctx = self.model.config.text.context_length
            notes.append(f"the query is longer than the model's {ctx}-token context: {int(batch.n_dropped[0])} "
                         "tokens at its end were ignored")
            n = int(batch.lengths[0])
            text = text[:max((b for a, b in batch.spans[0][:n] if b > a), default=len(text))]
        return text, notes

    def encode_image(self, image) -> np.ndarray:
        """One PIL image, preprocessed here (in the request's thread), encoded in a shared batch."""
        pixels = self.model.preprocessor.batch([image])[0]
        return self._wait(self.image_batcher, pixels)

    # --- searching --------------------------------------------------------------------------------------------------
    def _k(self, k: int) -> int:
        if not 1 <= int(k) <= self.settings.k_max:
            raise RequestError(422, f"k must be between 1 and {self.settings.k_max}, got {k}")
        return min(int(k), len(self.index))

    def hit_dict(self, hit) -> dict[str, Any]:
        d = {"rank": hit.rank, "score": round(float(hit.score), 6), "id": hit.id, "path": hit.path,
             "caption": hit.caption, "thumb": None}
        if self._has_path[hit.row] and self._row_of.get(hit.id) == hit.row:
            d["thumb"] = "/thumb/" + quote(hit.id, safe="")
        return d

    def search_text(self, q: str, k: int = 10) -> dict[str, Any]:
        k = self._k(k)
        t0 = time.perf_counter()
        text, notes = self.prepare_query(q)
        _, hits = self._wait(self.text_batcher, (text, k))
        return {"query": q, "k": k, "hits": [self.hit_dict(h) for h in hits], "warnings": notes,
                "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    def search_image(self, image, k: int = 10, *, exclude_self: bool = False) -> dict[str, Any]:
        k = self._k(k)
        t0 = time.perf_counter()
        vec = self.encode_image(image)
        hits = self.index.search(vec, k, exclude_self=exclude_self)
        return {"k": k, "exclude_self": exclude_self, "hits": [self.hit_dict(h) for h in hits], "warnings": [],
                "took_ms": round(1000 * (time.perf_counter() - t0), 2)}

    def embed_texts(self, texts: Sequence[str]) -> dict[str, Any]:
        if not isinstance(texts, (list, tuple)) or not texts:
            raise RequestError(422, "texts must be a non-empty list of strings")
        if len(texts) > self.settings.max_embed_texts:
            raise RequestError(422, f"at most {self.settings.max_embed_texts} texts per call, got {len(texts)}")
        notes, prepared = [], []
        for i, t in enumerate(texts):
            try:
                text, w = self.prepare_query(t)
            except RequestError as exc:
                raise RequestError(422, f"texts[{i}]: {exc}") from None
            prepared.append(text)
            notes += [f"texts[{i}]: {n}" for n in w]
        futures = [self.text_batcher.submit((t, 0)) for t in prepared]  # all queued at once: few model calls
        try:
            vecs = [f.result(self.settings.timeout_s)[0] for f in futures]
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise RequestError(504, f"the model did not answer within {self.settings.timeout_s:g} s") from None
        return {"model": self.model.config.name, "dim": self.index.dim, "vectors": [v.tolist() for v in vecs],
                "warnings": notes}

    def embed_image(self, image) -> dict[str, Any]:
        return {"model": self.model.config.name, "dim": self.index.dim, "vectors": [self.encode_image(image).tolist()],
                "warnings": []}

    # --- ids, thumbnails, explanations ------------------------------------------------------------------------------
    def row_of(self, id_: str) -> int:
        row = self._row_of.get(id_)
        if row is None:
            raise RequestError(404, "no such id in the index")
        return row

    def thumbnail(self, id_: str) -> bytes:
        data = self.thumbnails.get(self.row_of(id_))
        if data is None:
            raise RequestError(404, "no thumbnail for this id")
        return data

    def _row_image_features(self, row: int) -> torch.Tensor:
        """The image embedding behind ``row``: the vector stored in an image index when it is exact, else the row's
        image file encoded (a caption index, compressed codes, or an index that cannot give its vectors back)."""
        if self.index.info.get("field") == "image":
            try:
                vec, exact = self.index.vector(row)
                if exact:
                    return torch.from_numpy(vec)[None]
            except LookupError:
                pass
        path = self.thumbnails.safe_path(row)
        if path is None:
            raise RequestError(404, "this hit has no image to explain the query against")
        from .images import decode_upload

        img = decode_upload(path.read_bytes(), max_pixels=self.settings.max_image_pixels)
        return torch.from_numpy(self.encode_image(img))[None]

    def explain(self, q: str, id_: str) -> dict[str, Any]:
        """CLIP4DM on (the hit's image, the query): each query word's attribution to their cosine (negative: the
        word is evidence against the image), computed by gradient x attention in the text tower."""
        from ..metrics.clip4dm import EPSILON, TEMPLATE, caption_word_scores, text_attribution

        if self.settings.backend != "torch":
            raise RequestError(400, f"per-word explanations take gradients through the text tower: serve with "
                                    f"--backend torch (this service runs {self.settings.backend})")
        text, notes = self.prepare_query(q)
        row = self.row_of(id_)
        feats = self._row_image_features(row)
        if not self._explain_lock.acquire(timeout=self.settings.timeout_s):
            raise RequestError(503, "too many explanations in progress; try again")
        try:
            batch, _ = self._tokenize_quietly(TEMPLATE + text)  # the template may push a long query past the context
            att = text_attribution(self.model, None, batch, image_features=feats.to(self.model.dtype))
        finally:
            self._explain_lock.release()
        words = caption_word_scores(batch, 0, att.token_scores[0], skip_words=len(TEMPLATE.split()))
        return {"query": text, "id": id_, "row": row, "cosine": round(float(att.cosine[0]), 6),
                "words": [{"word": w, "score": float(s), "misaligned": bool(s < EPSILON)} for w, s in words],
                "method": "clip4dm", "warnings": notes}
