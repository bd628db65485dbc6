"""Which FAISS index to build for ``n`` vectors of dimension ``dim`` under a memory budget, and why.

The rule (``kind="auto"``), in the spirit of autofaiss, with every decision written down as a reason:

1. Up to ``approx_threshold`` vectors, exact search (``IndexFlatIP``) if the raw vectors fit the budget: a flat scan
   of 100k x 512 takes a few ms and needs no tuning.
2. Above it, IVF-Flat (full vectors in inverted lists) if they fit: the best recall per probe.
3. Otherwise IVF-SQ8 if it fits: each dimension stored as one byte (8-bit scalar quantiser, a quarter of the
   floats), recall close to IVF-Flat's.
4. Otherwise IVF-PQ: each vector is stored as ``m`` one-byte codes (``m`` divides ``dim``), the largest ``m`` that fits
   the budget (at most 64: longer codes slow every probe), with an OPQ rotation in front when each code covers 4 or more dimensions (where the rotation's
   balancing of variance across sub-spaces pays; at 2 dimensions per code it costs training time for little).
   If even 4-byte codes do not fit, the budget is refused with the smallest one that would work.

``nlist`` is ``4 sqrt(n)`` (at least 39 training points per list). From :data:`HNSW_COARSE_MIN_NLIST` lists on, the
coarse quantiser that assigns vectors and queries to lists is an HNSW graph over the centroids instead of a flat scan
of them (autofaiss's ``IVF..._HNSW32``): at 10M vectors (12,649 lists) a flat assignment costs 13k dot products per
vector added and per query, the graph a few hundred. The k-means training sample is :data:`TRAIN_PER_LIST` points per list, at most
:data:`MAX_TRAIN_POINTS` (never under the 39 per list faiss's k-means warns below): each k-means iteration costs
sample x nlist x dim, so 256 per list at 1M vectors (4,000 lists) would be a million-point sample. The estimates count the codes or vectors, the
8-byte ids of the inverted lists, the centroids and codebooks; file sizes come out within a few percent of them.
From :data:`TWO_LEVEL_MIN_NLIST` lists on, the centroids come from k-means in two levels (:mod:`cliplab.index.kmeans`).

An IVF index's inverted lists go on disk (``index.ivfdata``, memory-mapped: :mod:`cliplab.index.ondisk`) when asked
(``on_disk=True``) or, by default, when its estimate exceeds the memory budget (possible for a forced kind) or, with
no budget, :data:`ONDISK_ABOVE_BYTES`: neither the build nor a query server then holds them in memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .kmeans import two_level_groups

APPROX_THRESHOLD = 100_000
PLAN_KINDS = ("auto", "flat", "ivf", "ivfsq", "ivfpq", "hnsw")
#: the kinds with inverted lists (trained k-means, nprobe, lists on disk, a Ray build)
IVF_KINDS = ("ivf", "ivfsq", "ivfpq")
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30, "T": 2**40,
          "TB": 2**40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"4GB"``, ``"512 MB"``, ``"1.5G"`` or a number of bytes -> bytes (binary units); None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4GB, 512MB, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def default_nlist(n: int) -> int:
    return max(1, min(int(round(4 * n ** 0.5)), max(1, n // 39), n))


#: lists from which the coarse quantiser is an HNSW graph (``coarse="auto"``); about 1M vectors at the default nlist
HNSW_COARSE_MIN_NLIST = 4096
#: links per node of the coarse HNSW graph
COARSE_HNSW_M = 32
#: the k-means training sample's cap (training costs sample x nlist x dim per iteration)
MAX_TRAIN_POINTS = 1_000_000
#: k-means training points per list: faiss advises 39 to 256 (it warns below 39 and subsamples above 256);
#: autofaiss uses 100. 64 keeps a 1M-vector build's k-means at a quarter of a million points.
TRAIN_PER_LIST = 64
#: the fewest training points per list (faiss's k-means warns below this)
MIN_TRAIN_PER_LIST = 39
COARSE_KINDS = ("auto", "flat", "hnsw")
#: lists from which the coarse centroids come from k-means in two levels (``kmeans="auto"``; about 262k vectors at
#: the default nlist): one k-means costs sample x nlist x dim per iteration, growing with nlist squared
#: (:mod:`cliplab.index.kmeans`)
TWO_LEVEL_MIN_NLIST = 2048
KMEANS_KINDS = ("auto", "one-level", "two-level")


def train_points(n: int, nlist: int, per_list: int = TRAIN_PER_LIST) -> int:
    """How many vectors train the IVF quantiser: ``per_list`` per list, capped at :data:`MAX_TRAIN_POINTS` but never
    under the 39 per list k-means needs, and never more than ``n``."""
    return min(n, max(MIN_TRAIN_PER_LIST * nlist, min(per_list * nlist, MAX_TRAIN_POINTS)))


@dataclass
class IndexPlan:
    kind: str
    factory: str
    est_bytes: int
    nlist: int | None = None
    pq_m: int | None = None
    opq: bool = False
    hnsw_m: int | None = None
    coarse: str | None = None  # the IVF kinds' coarse quantiser: "flat" or "hnsw"
    train_points: int | None = None  # the IVF kinds' k-means training sample
    kmeans: str | None = None  # the IVF kinds' k-means: "one-level" (faiss's) or "two-level"
    on_disk: bool = False  # the IVF kinds' inverted lists in index.ivfdata (memory-mapped), not in memory
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_bytes(kind: str, n: int, dim: int, *, nlist: int = 1, pq_m: int = 0, opq: bool = False,
                   hnsw_m: int = 32, coarse: str = "flat") -> int:
    graph = nlist * COARSE_HNSW_M * 2 * 4 if coarse == "hnsw" else 0  # the coarse graph's links
    if kind == "flat":
        return n * dim * 4
    if kind == "ivf":
        return n * (dim * 4 + 8) + nlist * dim * 4 + graph
    if kind == "ivfsq":  # one byte per dimension; the quantiser's per-dimension ranges
        return n * (dim + 8) + nlist * dim * 4 + graph + 2 * dim * 4
    if kind == "ivfpq":
        return n * (pq_m + 8) + nlist * dim * 4 + graph + 256 * dim * 4 + (dim * dim * 4 if opq else 0)
    if kind == "hnsw":
        return n * (dim * 4 + hnsw_m * 2 * 4 + 8)
    raise ValueError(f"unknown index kind {kind!r}")


#: longer codes make every probe slower (one table lookup per byte) for little top-10 recall; re-ranking with the
#: exact vectors (``rerank``) is the cheaper way to the last points of recall
MAX_PQ_M = 64


def _pq_choices(dim: int) -> list[int]:
    """Code sizes (bytes per vector) that divide ``dim``, largest first: 4 to :data:`MAX_PQ_M` bytes, at least 2
    dimensions per code."""
    return sorted({m for m in range(4, min(dim // 2, MAX_PQ_M) + 1) if dim % m == 0}, reverse=True)


def _fmt(b: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b} B"


def plan_index(n: int, dim: int, *, kind: str = "auto", max_memory: int | str | None = None,
               approx_threshold: int = APPROX_THRESHOLD, nlist: int | None = None, pq_m: int | None = None,
               opq: bool | None = None, hnsw_m: int = 32, coarse: str = "auto",
               train_per_list: int = TRAIN_PER_LIST, on_disk: bool | None = None, kmeans: str = "auto") -> IndexPlan:
    """The index for ``n`` x ``dim`` vectors: ``kind`` forces a family (its sizes still chosen here);
    ``max_memory`` (bytes or ``"4GB"``) bounds the index's estimated size; ``coarse`` the IVF kinds' coarse
    quantiser (``auto``: an HNSW graph from :data:`HNSW_COARSE_MIN_NLIST` lists on); ``train_per_list`` the IVF
    kinds' k-means sample per list (see :func:`train_points`); ``kmeans`` how their centroids are found
    (``auto``: in two levels from :data:`TWO_LEVEL_MIN_NLIST` lists on; :mod:`cliplab.index.kmeans`). ``on_disk``:
    keep an IVF kind's inverted lists on disk (:mod:`cliplab.index.ondisk`); ``None`` does so when the index's
    estimate exceeds the memory budget (a forced kind) or, with no budget, :data:`ONDISK_ABOVE_BYTES`."""
    plan = _plan_kind(n, dim, kind=kind, max_memory=max_memory, approx_threshold=approx_threshold, nlist=nlist,
                      pq_m=pq_m, opq=opq, hnsw_m=hnsw_m, coarse=coarse, train_per_list=train_per_list,
                      kmeans=kmeans)
    if plan.kind in IVF_KINDS:
        _place_lists(plan, on_disk, parse_bytes(max_memory))
    elif on_disk:
        raise ValueError(f"on-disk inverted lists need an IVF index (ivf, ivfsq, ivfpq), not {plan.kind} "
                         f"({plan.reasons[0]}); ask for kind ivf, ivfsq or ivfpq")
    return plan


#: with no memory budget, an IVF index estimated larger than this keeps its lists on disk (``on_disk=None``)
ONDISK_ABOVE_BYTES = 4 * 2**30


def _place_lists(plan: IndexPlan, on_disk: bool | None, budget: int | None) -> None:
    """Whether ``plan``'s inverted lists go on disk, with the reason."""
    if on_disk is None:
        limit = budget if budget is not None else ONDISK_ABOVE_BYTES
        on_disk = plan.est_bytes > limit
        if on_disk:
            what = f"the budget of {_fmt(budget)}" if budget is not None else f"{_fmt(limit)} (no budget given)"
            plan.reasons.append(f"inverted lists on disk (index.ivfdata, memory-mapped): the index "
                                f"({_fmt(plan.est_bytes)}) exceeds {what}; a query pages in only the lists it probes")
    elif on_disk:
        plan.reasons.append("inverted lists on disk (index.ivfdata, memory-mapped), as asked")
    plan.on_disk = bool(on_disk)


def _plan_kind(n: int, dim: int, *, kind: str, max_memory, approx_threshold: int, nlist: int | None,
               pq_m: int | None, opq: bool | None, hnsw_m: int, coarse: str, train_per_list: int,
               kmeans: str = "auto") -> IndexPlan:
    """The index family and its sizes (see :func:`plan_index`)."""
    if kind not in PLAN_KINDS:
        raise ValueError(f"kind must be one of {PLAN_KINDS}, got {kind!r}")
    if coarse not in COARSE_KINDS:
        raise ValueError(f"coarse must be one of {COARSE_KINDS}, got {coarse!r}")
    if kmeans not in KMEANS_KINDS:
        raise ValueError(f"kmeans must be one of {KMEANS_KINDS}, got {kmeans!r}")
    if n < 1 or dim < 1:
        raise ValueError(f"need at least one vector of dimension >= 1, got n={n}, dim={dim}")
    budget = parse_bytes(max_memory)
    nl = max(1, min(nlist, n)) if nlist else default_nlist(n)
    reasons: list[str] = []
    fits = (lambda b: True) if budget is None else (lambda b: b <= budget)
    limit = "no memory budget" if budget is None else f"the budget of {_fmt(budget)}"
    cq = coarse if coarse != "auto" else ("hnsw" if nl >= HNSW_COARSE_MIN_NLIST else "flat")
    ivf_name = f"IVF{nl}_HNSW{COARSE_HNSW_M}" if cq == "hnsw" else f"IVF{nl}"
    if train_per_list < 1:
        raise ValueError(f"train_per_list must be >= 1, got {train_per_list}")
    n_train = train_points(n, nl, train_per_list)
    km = kmeans if kmeans != "auto" else ("two-level" if nl >= TWO_LEVEL_MIN_NLIST else "one-level")

    def ivf_reasons():
        if cq == "hnsw":
            why = "as asked" if coarse == "hnsw" else f"{nl} lists >= {HNSW_COARSE_MIN_NLIST}"
            reasons.append(f"coarse quantiser: an HNSW graph over the {nl} centroids ({why}): assigning a vector or "
                           f"a query visits a few hundred centroids instead of all {nl}")
        if n_train < n:
            reasons.append(f"k-means trained on {n_train:,} sampled vectors ({n_train // nl} per list: "
                           f"{train_per_list} asked, at least {MIN_TRAIN_PER_LIST}, at most {MAX_TRAIN_POINTS:,} "
                           f"in all; faiss advises 39-256 per list)")
        if km == "two-level":
            why = "as asked" if kmeans == "two-level" else f"{nl} lists >= {TWO_LEVEL_MIN_NLIST}"
            groups = two_level_groups(nl)
            reasons.append(f"k-means in two levels ({why}): {groups} groups, then each split into its share of the "
                           f"{nl} centroids; each point meets about {2 * groups} centroids per iteration instead of "
                           f"{nl}")

    def flat():
        return IndexPlan("flat", "Flat", estimate_bytes("flat", n, dim), reasons=reasons)

    def ivf():
        ivf_reasons()
        return IndexPlan("ivf", f"{ivf_name},Flat", estimate_bytes("ivf", n, dim, nlist=nl, coarse=cq), nlist=nl,
                         coarse=cq, train_points=n_train, kmeans=km, reasons=reasons)

    def ivfsq():
        ivf_reasons()
        return IndexPlan("ivfsq", f"{ivf_name},SQ8", estimate_bytes("ivfsq", n, dim, nlist=nl, coarse=cq),
                         nlist=nl, coarse=cq, train_points=n_train, kmeans=km, reasons=reasons)

    def hnsw():
        return IndexPlan("hnsw", f"HNSW{hnsw_m},Flat", estimate_bytes("hnsw", n, dim, hnsw_m=hnsw_m), hnsw_m=hnsw_m,
                         reasons=reasons)

    def ivfpq():
        choices = [pq_m] if pq_m else _pq_choices(dim)
        if not choices:
            raise ValueError(f"no product-quantiser code size divides dimension {dim} (need a divisor >= 4)")
        for m in choices:
            use_opq = (dim // m >= 4) if opq is None else opq
            est = estimate_bytes("ivfpq", n, dim, nlist=nl, pq_m=m, opq=use_opq, coarse=cq)
            if fits(est) or pq_m:
                prefix = f"OPQ{m}_{dim}," if use_opq else ""
                if pq_m:
                    why = "as asked"
                elif m == choices[0] and m == MAX_PQ_M:
                    why = f"the longest code used (longer ones slow every probe); it fits {limit}"
                else:
                    why = f"the longest code that fits {limit}"
                reasons.append(f"IVF-PQ with {m}-byte codes ({dim // m} dimensions per code): {why}")
                if use_opq:
                    reasons.append("OPQ rotation in front: each code covers 4 or more dimensions, where balancing "
                                   "their variance lowers the quantisation error")
                ivf_reasons()
                return IndexPlan("ivfpq", f"{prefix}{ivf_name},PQ{m}x8", est, nlist=nl, pq_m=m, opq=use_opq,
                                 coarse=cq, train_points=n_train, kmeans=km, reasons=reasons)
        smallest = estimate_bytes("ivfpq", n, dim, nlist=nl, pq_m=choices[-1], opq=False, coarse=cq)
        raise ValueError(f"{n:,} vectors of dimension {dim} need at least {_fmt(smallest)} even as {choices[-1]}-byte "
                         f"codes; raise the memory budget (now {_fmt(budget)})")

    if kind == "flat":
        reasons.append("flat (exact) index, as asked")
        return flat()
    if kind == "ivf":
        reasons.append("IVF-Flat, as asked")
        return ivf()
    if kind == "ivfsq":
        reasons.append("IVF-SQ8 (one byte per dimension), as asked")
        return ivfsq()
    if kind == "hnsw":
        reasons.append("HNSW, as asked")
        return hnsw()
    if kind == "ivfpq":
        return ivfpq()
    flat_bytes = estimate_bytes("flat", n, dim)
    if n <= approx_threshold and fits(flat_bytes):
        reasons.append(f"{n:,} vectors <= {approx_threshold:,}: exact search is fast enough at this size "
                       f"({_fmt(flat_bytes)} of vectors)")
        return flat()
    if n <= approx_threshold:
        reasons.append(f"{n:,} vectors would be exact-searched, but {_fmt(flat_bytes)} exceeds {limit}")
    else:
        reasons.append(f"{n:,} vectors > {approx_threshold:,}: an approximate index, its recall measured")
    ivf_bytes = estimate_bytes("ivf", n, dim, nlist=nl, coarse=cq)
    if fits(ivf_bytes):
        reasons.append(f"IVF-Flat with {nl} lists: full vectors ({_fmt(ivf_bytes)}) fit {limit}")
        return ivf()
    sq_bytes = estimate_bytes("ivfsq", n, dim, nlist=nl, coarse=cq)
    if fits(sq_bytes):
        reasons.append(f"full vectors ({_fmt(ivf_bytes)}) exceed {limit}; IVF-SQ8 with {nl} lists: one byte per "
                       f"dimension ({_fmt(sq_bytes)}) fits, recall close to IVF-Flat's")
        return ivfsq()
    reasons.append(f"full vectors ({_fmt(ivf_bytes)}) and 8-bit scalar codes ({_fmt(sq_bytes)}) exceed {limit}: "
                   f"product-quantiser codes")
    return ivfpq()
