"""Binary PV-DBOW on real captions: caption-to-caption retrieval on Flickr8k (the other captions of the same photo are
the relevant documents), 32-bit binary codes against the real-valued PV-DBOW of the same size, the real PV's codes
binarised after training (sign at each dimension's median), random codes and TF-IDF cosine.

Every PV arm trains on all 40,455 captions (PV is transductive) with the same seed, epochs, batch and learning rate;
the evaluation ranks the 5,000 captions of the first 1,000 photos among themselves (queries leave themselves out).

    python experiments/binary_pv_flickr8k.py   # writes experiments/results/binary_pv_flickr8k.json (~10 CPU-min)
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from cliplab.textrep.binary_pv_dsg import build_vocabulary, retrieval_precision, train_pv
from cliplab.textrep.hamming import HammingIndex, hamming_distances, hamming_ranking, pack_codes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "all_captions.csv"
OUT = ROOT / "experiments" / "results" / "binary_pv_flickr8k.json"
EVAL_IMAGES = 1000
SETTINGS = dict(epochs=6, batch_size=4096, lr=0.03, seed=0)


def mean_average_precision(ranking: np.ndarray, labels: np.ndarray) -> float:
    aps = []
    for q, row in enumerate(ranking):
        row = row[row != q]
        rel = labels[row] == labels[q]
        hits = np.cumsum(rel)
        aps.append(float((hits[rel] / (np.flatnonzero(rel) + 1)).mean()) if rel.any() else 0.0)
    return float(np.mean(aps))


def cosine_ranking(z: torch.Tensor) -> np.ndarray:
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return torch.argsort(-(z @ z.T), dim=1, stable=True).numpy()


def scores(ranking: np.ndarray, labels: np.ndarray) -> dict:
    return {"p@4": retrieval_precision(ranking, labels, 4), "p@10": retrieval_precision(ranking, labels, 10),
            "map": mean_average_precision(ranking, labels)}


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices on a shared machine: one thread is faster
    with open(DATA, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images, captions = [r["image"] for r in rows], [r["caption"] for r in rows]
    order = list(dict.fromkeys(images))
    image_id = {im: i for i, im in enumerate(order)}
    labels_all = np.array([image_id[im] for im in images])
    vocab = build_vocabulary(captions, min_count=3)
    docs = [vocab.encode(c) for c in captions]
    eval_rows = np.flatnonzero(labels_all < EVAL_IMAGES)
    labels = labels_all[eval_rows]
    results = {"data": str(DATA.relative_to(ROOT.parent)), "captions": len(captions), "images": len(order),
               "vocabulary": len(vocab), "eval_captions": len(eval_rows), "eval_images": EVAL_IMAGES,
               "settings": SETTINGS, "arms": {}}

    def record(name, ranking, seconds=None):
        results["arms"][name] = {**scores(ranking, labels), **({"train_s": round(seconds, 1)} if seconds else {})}
        print(name, results["arms"][name], flush=True)

    for bits in (32, 64):
        t0 = time.perf_counter()
        binary = train_pv(docs, len(vocab), bits=bits, binary=True, **SETTINGS)
        codes = pack_codes(binary.codes()[eval_rows].numpy())
        ranking = HammingIndex(bits).add(codes).rank(codes)
        assert np.array_equal(ranking, hamming_ranking(hamming_distances(codes, codes)))  # FAISS = XOR-popcount
        record(f"binary_pv_{bits}bit", ranking, time.perf_counter() - t0)
        if bits != 32:
            continue  # the real-valued control at 32 dimensions only (CPU budget)
        t0 = time.perf_counter()
        real = train_pv(docs, len(vocab), bits=bits, binary=False, **SETTINGS)
        z = real.codes()[eval_rows]
        record(f"real_pv_{bits}d", cosine_ranking(z), time.perf_counter() - t0)
        post = (z > z.median(dim=0).values).to(torch.uint8).numpy()  # binarised after training
        pc = pack_codes(post)
        record(f"real_pv_{bits}d_binarised_after", hamming_ranking(hamming_distances(pc, pc)))
        rnd = pack_codes(np.random.default_rng(0).integers(0, 2, (len(eval_rows), bits)))
        record(f"random_{bits}bit", hamming_ranking(hamming_distances(rnd, rnd)))

    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer().fit(captions).transform([captions[i] for i in eval_rows])
    record("tfidf_cosine", cosine_ranking(torch.tensor(tfidf.toarray())))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
