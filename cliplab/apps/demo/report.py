"""A single self-contained HTML file: thumbnails as inline base64 PNG, plots (matplotlib, when installed) as inline
PNG too, no external assets, so the report opens offline and can be mailed around."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report", "png_data_uri"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
     padding:0 1em;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.muted{color:#777} .warn{background:#fff4d6;border:1px solid #e8c66a;padding:.6em 1em;border-radius:6px}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .6em;border-bottom:1px solid #eee;text-align:left;
     vertical-align:top} th{background:#fafafa}
.kpis{display:flex;flex-wrap:wrap;gap:1em} .kpi{border:1px solid #ddd;border-radius:8px;padding:.6em 1em;min-width:9em}
.kpi b{display:block;font-size:1.5em}
.row{display:flex;gap:.6em;flex-wrap:wrap;align-items:flex-start;margin:.4em 0 1.2em}
figure{margin:0;width:112px;font-size:.72em;text-align:center}
figure img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc;border-radius:4px}
figure.query img{border:2px solid #2a6fdb} .score{font-weight:600}
.hit-ok img{border:2px solid #2b9a3e}
.plots img{max-width:100%;border:1px solid #eee;border-radius:6px}
code{background:#f4f4f4;padding:0 .3em;border-radius:3px}
"""


def png_data_uri(image) -> str:
    """A PIL image -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(details: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(title, data uri)]``; empty when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
    except ImportError:
        return []
    out = []
    r = details["retrieval"]
    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.add_subplot()
    bins = np.linspace(min(r["_other"].min(), r["_match"].min()), max(r["_other"].max(), r["_match"].max()), 40)
    ax.hist(r["_other"], bins=bins, density=True, alpha=.6, label="other pairs")
    ax.hist(r["_match"], bins=bins, density=True, alpha=.6, label="caption & its scene")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    out.append(("Image-caption similarity", _figure_uri(fig)))

    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.add_subplot()
    c = r["_curves"]
    ax.plot(c["k"], c["text_to_image"], marker="o", label="text → image")
    ax.plot(c["k"], c["image_to_text"], marker="s", label="image → text")
    ax.plot(c["k"], [k / r["n"] for k in c["k"]], ls="--", color="grey", label="chance")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False)
    out.append((f"Retrieval over the {r['n']}-scene gallery", _figure_uri(fig)))

    for z in details["zero_shot"]:
        conf = np.asarray(z["confusion"], dtype=float)
        conf = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        fig = Figure(figsize=(4.2, 3.6))
        ax = fig.add_subplot()
        im = ax.imshow(conf, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(z["classes"])), z["classes"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(z["classes"])), z["classes"], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(im, ax=ax, fraction=.046)
        out.append((f"Zero-shot {z['kind']}: accuracy {z['accuracy']:.1%}", _figure_uri(fig)))
    return out


def _thumb(source, hit: dict[str, Any], cache: dict[int, str]) -> str:
    key = source.offset + int(hit["index"])
    if key not in cache:
        cache[key] = png_data_uri(source.world.sample(key).render())
    return cache[key]


def _fig(uri: str, caption: str, cls: str = "") -> str:
    return (f'<figure class="{cls}"><img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def write_report(path: str | Path, summary: dict[str, Any], details: dict[str, Any]) -> Path:
    path = Path(path)
    e = html.escape
    source = details["source"]
    cache: dict[int, str] = {}
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cliplab demo: {e(summary['model'])}"
             f"</title><style>{_CSS}</style></head><body>",
             "<h1>cliplab demo</h1>",
             f"<p class='muted'>Model <code>{e(summary['model'])}</code> "
             f"({e(str(summary.get('model_source')))}) on {summary['gallery']} synthetic scenes (seed "
             f"{summary['seed']}); everything ran offline.</p>"]
    if summary["random_weights"]:
        parts.append("<p class='warn'>This model has <b>random weights</b>: the pipeline ran end to end, but the "
                     "retrieval and classification numbers below are chance level by construction.</p>")
    rt = summary["retrieval"]
    zs = summary["zero_shot"]
    kpis = [("gallery", f"{summary['gallery']}"), ("embed rate", f"{summary['embed_items_per_s']}/s"),
            ("text→image R@1", f"{rt['text_to_image_r@1']:.1%}"), ("text→image R@5", f"{rt['text_to_image_r@5']:.1%}"),
            ("image→text R@5", f"{rt['image_to_text_r@5']:.1%}")]
    kpis += [(f"zero-shot {k}", f"{v['accuracy']:.1%} <span class='muted'>(chance {v['chance']:.0%})</span>")
             for k, v in zs.items()]
    parts.append("<div class='kpis'>" + "".join(f"<div class='kpi'>{e(a)}<b>{b}</b></div>" for a, b in kpis)
                 + "</div>")

    parts.append("<h2>Text queries</h2><p class='muted'>Top results from the index for each query (cosine score). "
                 "The last two queries are captions of scenes that are <i>not</i> in the gallery.</p>")
    for r in details["text_results"]:
        parts.append(f"<h3>“{e(r['query'])}”</h3><div class='row'>")
        for h in r["hits"]:
            cap = f"<span class='score'>{h['score']:.3f}</span><br>{e(h['caption'] or h['id'])}"
            parts.append(_fig(_thumb(source, h, cache), cap))
        parts.append("</div>")

    parts.append("<h2>Image queries</h2><p class='muted'>A new scene (blue frame) and its nearest gallery scenes."
                 "</p>")
    for r in details["image_results"]:
        parts.append("<div class='row'>")
        parts.append(_fig(png_data_uri(r["query_image"]), "query: " + e(r["query_caption"]), "query"))
        for h in r["hits"]:
            cap = f"<span class='score'>{h['score']:.3f}</span><br>{e(h['caption'] or h['id'])}"
            parts.append(_fig(_thumb(source, h, cache), cap))
        parts.append("</div>")

    parts.append("<h2>Zero-shot classification</h2>")
    for z in details["zero_shot"]:
        parts.append(f"<h3>{e(z['kind'])}: {z['accuracy']:.1%} on {z['n']} single-object scenes "
                     f"({len(z['classes'])} classes, {z['prompts_per_class']} prompts each; chance "
                     f"{z['chance']:.1%})</h3><div class='row'>")
        for ex in z["_examples"]:
            ok = ex["label"] == ex["pred"]
            parts.append(_fig(png_data_uri(ex["image"]), f"true {e(ex['label'])}<br>pred <b>{e(ex['pred'])}</b>",
                              "hit-ok" if ok else ""))
        parts.append("</div>")

    plots = _plots(details)
    parts.append("<h2>Plots</h2>")
    if plots:
        parts.append("<div class='plots'>" + "".join(f"<h3>{e(t)}</h3><img src='{u}' alt='{e(t)}'>" for t, u in plots)
                     + "</div>")
    else:
        parts.append("<p class='muted'>matplotlib is not installed: no plots (pip install matplotlib).</p>")

    ii = details["index_info"]
    parts.append("<h2>Run</h2><table>")
    rows = [("index", f"{ii['kind']} over {ii['n']} image vectors, dim {ii['dim']}, recall@10 {ii['recall_at_10']}"),
            ("retrieval", ", ".join(f"{k} {v}" for k, v in rt.items())),
            ("caption finds its own scene in top 5", f"{summary['caption_finds_own_scene_top5']:.1%}"),
            ("timings (s)", ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items())),
            ("versions", ", ".join(f"{k} {v}" for k, v in details["manifest"]["versions"].items()))]
    parts += [f"<tr><th>{e(a)}</th><td>{e(str(b))}</td></tr>" for a, b in rows]
    parts.append("</table>")
    parts.append("<details><summary>summary.json</summary><pre>" + e(json.dumps(summary, indent=2)) +
                 "</pre></details></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
