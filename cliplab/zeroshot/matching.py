"""Box operations and DETR's Hungarian matcher (public: any method that matches predicted boxes to targets).

Boxes are ``[..., 4]`` tensors, either ``cxcywh`` (centre x, centre y, width, height) or ``xyxy`` (corners), in any
consistent unit (DETR-style heads predict normalised ``cxcywh`` in ``[0, 1]``).

* :func:`box_cxcywh_to_xyxy` / :func:`box_xyxy_to_cxcywh`: exact inverses of each other.
* :func:`box_iou`, :func:`generalized_box_iou`: pairwise ``[N, M]`` matrices (GIoU of Rezatofighi et al. 2019:
  ``IoU - (|C| - |A u B|) / |C|`` with ``C`` the smallest enclosing box; 1 for equal boxes, in ``(-1, 1]``).
* :func:`match_cost`: DETR's matching cost without the class term, ``cost_l1 * L1(cxcywh) + cost_giou * (-GIoU)``
  (GRAIN's weights 5 and 2 by default).
* :func:`hungarian_match`: the minimum-cost one-to-one assignment (``scipy.optimize.linear_sum_assignment``);
  :func:`brute_force_match` enumerates every assignment (for tests and tiny problems).
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou", "generalized_box_iou", "match_cost",
           "hungarian_match", "batched_hungarian_match", "brute_force_match"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes (0 for degenerate ones)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _check_xyxy(boxes: torch.Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be [N, 4] xyxy boxes, got shape {tuple(boxes.shape)}")
    if (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"{name} has boxes with x1 < x0 or y1 < y0: convert cxcywh with box_cxcywh_to_xyxy first")


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU ``[N, M]`` of ``xyxy`` boxes, and the union areas ``[N, M]``."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU ``[N, M]`` of ``xyxy`` boxes."""
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = (wh[..., 0] * wh[..., 1]).clamp(min=1e-12)
    return iou - (enclosing - union) / enclosing


def match_cost(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, cost_l1: float = 5.0,
               cost_giou: float = 2.0) -> torch.Tensor:
    """``[Q, T]`` cost of assigning prediction ``q`` to target ``t``: ``cost_l1 * |p - t|_1 + cost_giou * (-GIoU)``,
    both boxes ``cxcywh`` (the L1 term on ``cxcywh`` coordinates, as DETR)."""
    l1 = torch.cdist(pred_boxes.float(), target_boxes.float(), p=1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes.float()), box_cxcywh_to_xyxy(target_boxes.float()))
    return cost_l1 * l1 - cost_giou * giou


@torch.no_grad()
def hungarian_match(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, cost_l1: float = 5.0,
                    cost_giou: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-cost assignment of ``T <= Q`` targets to ``Q`` predictions (one image): ``(pred_index,
    target_index)``, each ``[min(Q, T)]`` long, sorted by ``pred_index``."""
    from scipy.optimize import linear_sum_assignment

    if target_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = match_cost(pred_boxes.detach(), target_boxes, cost_l1, cost_giou)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def batched_hungarian_match(pred_boxes: torch.Tensor, targets: list[torch.Tensor], cost_l1: float = 5.0,
                            cost_giou: float = 2.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`hungarian_match` per image: ``pred_boxes`` ``[B, Q, 4]``, ``targets`` B tensors ``[T_b, 4]``."""
    if len(targets) != pred_boxes.shape[0]:
        raise ValueError(f"{len(targets)} target lists for a batch of {pred_boxes.shape[0]} predictions")
    return [hungarian_match(p, t, cost_l1, cost_giou) for p, t in zip(pred_boxes, targets)]


def brute_force_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The minimum-cost assignment of a ``[Q, T]`` cost matrix (``T <= Q``) by enumerating every injective map of
    targets to predictions: ``(pred_index, target_index, total cost)``, sorted by ``pred_index``. Q!/(Q-T)! tries:
    only for small problems (tests)."""
    q, t = cost.shape
    if t > q:
        raise ValueError(f"more targets ({t}) than predictions ({q}): transpose the cost matrix")
    best, best_rows = float("inf"), None
    for rows in itertools.permutations(range(q), t):
        total = float(sum(cost[r, c] for c, r in enumerate(rows)))
        if total < best:
            best, best_rows = total, rows
    pairs = sorted(zip(best_rows or (), range(t)))
    return (torch.tensor([p for p, _ in pairs], dtype=torch.long), torch.tensor([c for _, c in pairs], dtype=torch.long),
            best if t else 0.0)
