"""MAFT+ on the synthetic world: train on six shapes, evaluate mIoU on the two held-out ones (oracle object-mask
proposals, vocabulary all eight shapes). Arms share seed, data, steps and trained blocks:
frozen shapes-tiny | CDT + RC | CDT without RC | RC without CDT | CDT + RC at the paper's weight 0.1.
``python experiments/maft_plus_heldout.py [STEPS [ARM,ARM...]]`` runs only the named arms and merges them into the
JSON.
Writes experiments/results/maft_plus-2026-12-07.json. About 10 minutes on 2 busy shared CPU cores."""

import json
import sys
import time
from pathlib import Path

import cliplab
from cliplab.dense.maft_plus import MaftConfig, MaftPlus, evaluate_open_vocab, train_maft_plus

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
N_EVAL = 100


def main():
    seen = MaftConfig().seen
    out = Path(__file__).parent / "results" / "maft_plus-2026-12-07.json"
    arms = {"cdt+rc": {}, "cdt, no rc": {"rc_weight": 0.0}, "rc, no cdt": {"use_cdt": False},
            "cdt+rc 0.1": {"rc_weight": 0.1}}
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(arms)
    res = json.loads(out.read_text()) if len(sys.argv) > 2 and out.exists() else {}
    res.update({"steps": STEPS, "eval_scenes": N_EVAL, "seen": list(seen)})
    t = time.time()
    if "frozen" in only or "frozen" not in res:
        res["frozen"] = evaluate_open_vocab(MaftPlus(cliplab.load("shapes-tiny")), seen, n=N_EVAL)
    for name, kw in arms.items():
        if name not in only:
            continue
        maft = train_maft_plus(cliplab.load("shapes-tiny"), MaftConfig(steps=STEPS, **kw))
        res[name] = evaluate_open_vocab(maft, seen, n=N_EVAL)
        print(name, {k: round(v, 4) for k, v in res[name].items() if k.endswith("miou")}, flush=True)
    print("frozen", {k: round(v, 4) for k, v in res["frozen"].items() if k.endswith("miou")})
    res["seconds"] = round(time.time() - t, 1)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
