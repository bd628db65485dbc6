"""Figure for docs/methods/lexinvariant_lm.md: bits per byte by position, standard vs lexinvariant LM, plain and
ciphered text, from experiments/results/textrep_lm_lexinvariant.json (run textrep_lm_lexinvariant.py first).

    python experiments/textrep_lm_lexinvariant_figure.py   # writes docs/img/lexinvariant_lm.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "results" / "textrep_lm_lexinvariant.json"
OUT = ROOT / "docs" / "img" / "lexinvariant_lm.png"


def main() -> None:
    curves = json.loads(DATA.read_text())["curve_every_8"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    style = {"standard_plain": ("standard LM, plain", "C0", "-"), "standard_cipher": ("standard LM, ciphered", "C0", "--"),
             "lexinvariant_plain": ("lexinvariant, plain", "C1", "-"),
             "lexinvariant_cipher": ("lexinvariant, ciphered", "C1", "--")}
    for key, (label, colour, ls) in style.items():
        ys = curves[key]
        ax.plot([1 + 8 * i for i in range(len(ys))], ys, ls, color=colour, label=label)
    ax.axhline(8.02, color="grey", lw=0.8, ls=":", label="uniform (8.02)")
    ax.set_xlabel("position in the 256-byte window")
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=7, ncol=2, loc="center right")
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT)


if __name__ == "__main__":
    main()
