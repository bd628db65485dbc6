"""Evaluation harness: datasets and metrics as registries, an on-disk embedding cache, JSON + Markdown reports.

    import cliplab
    from cliplab.eval import evaluate
    model = cliplab.create_model("test-tiny", seed=0)
    res = evaluate("zeroshot", model, "synthetic-zeroshot", dataset_options={"kind": "colour"}, out_dir="runs/zs")
    res["metrics"]["top1"]

Tasks: ``zeroshot``, ``retrieval``, ``clipscore``, ``winoground`` (``list_tasks()``); datasets: ``list_datasets()``;
metrics: ``list_metrics()``. See docs/evaluation.md.
"""

from .cache import CachedEncoder, EmbeddingCache, default_cache_dir, file_identity, item_key, model_identity
from .datasets import (
    DATASETS,
    CaptionData,
    ClassificationData,
    ImageItem,
    WinogroundData,
    list_datasets,
    load_dataset,
    prettify_classname,
    register_dataset,
)
from .metrics import (
    METRICS,
    chance_i2t_recall,
    clip_score,
    compute_metrics,
    confusion_matrix,
    dense_confusion,
    harmonic_mean,
    list_metrics,
    most_confused,
    per_class_recall,
    ref_clip_score,
    register_metric,
    retrieval_ranks,
    retrieval_recall,
    sparse_confusion,
    target_ranks,
    topk_accuracy,
    winoground_scores,
)
from .report import render_markdown, render_text, save_confusion_png, write_report
from .tasks import (
    TASKS,
    align_classnames,
    evaluate,
    list_tasks,
    load_model,
    looks_like_id,
    register_task,
    run_task,
)

__all__ = [
    "CachedEncoder", "EmbeddingCache", "default_cache_dir", "file_identity", "item_key", "model_identity",
    "DATASETS", "CaptionData", "ClassificationData", "ImageItem", "WinogroundData", "list_datasets", "load_dataset",
    "prettify_classname", "register_dataset",
    "METRICS", "chance_i2t_recall", "clip_score", "compute_metrics", "confusion_matrix", "dense_confusion",
    "harmonic_mean", "list_metrics", "most_confused", "per_class_recall", "ref_clip_score", "register_metric",
    "retrieval_ranks", "retrieval_recall", "sparse_confusion", "target_ranks", "topk_accuracy", "winoground_scores",
    "render_markdown", "render_text", "save_confusion_png", "write_report",
    "TASKS", "align_classnames", "evaluate", "list_tasks", "load_model", "looks_like_id", "register_task",
    "run_task",
]
