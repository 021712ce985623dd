"""Pole and crossarm detection with Ultralytics YOLOv8n, trained by nexa_nb (tutorial 02).

Everything the notebook needs to turn `yolo_data` images into a `nexa_nb.Task`:

- `DetectionImages`: a map-style dataset of ``(image, labels)``: image float32 (3, H, W)
  in [0, 1], labels float32 (k, 5) rows ``[class, cx, cy, w, h]`` (YOLO format, fractions).
- `collate`: the batch dict Ultralytics' detection loss reads,
  ``{"img", "batch_idx", "cls", "bboxes"}``.
- `make_model`: the real YOLOv8n ``DetectionModel`` built from its yaml (random weights,
  nothing downloaded) with ``nc=2`` and the loss gains in ``model.args``; its box head starts
  at small boxes (`start_with_small_boxes`), or thin crossarms are never learnt at 128 px.
- `assigned_share`: per class, the share of true boxes the loss's assigner trains on.
- `forward` / `loss_fn`: ``v8DetectionLoss`` through the model's own training forward,
  reduced to the scalar nexa_nb backpropagates.
- `predict`: inference plus Ultralytics' ``non_max_suppression``.
- `metrics`: mAP50 (and mAP50-95, precision, recall) of held-out images, with
  Ultralytics' own box matching and ``DetMetrics`` / ``ap_per_class``.

Ultralytics is AGPL-3.0 licensed; it comes with the ``yolo`` extra
(``pip install "nexa-nb[yolo]"``) and is imported only by the functions here, never by
``import nexa_nb``.

No network: before its first import the module sets ``YOLO_OFFLINE=1`` (Ultralytics
otherwise resolves public DNS names at import to decide whether it is online),
``YOLO_AUTOINSTALL=False`` (no pip installs at run time) and ``YOLO_VERBOSE=False``; a value
already in the environment wins. The model comes from the yaml shipped inside the
package; no weights and no fonts are fetched (boxes are drawn with matplotlib).

NMS: Ultralytics' ``non_max_suppression`` calls ``torchvision.ops.nms`` only when
torchvision is already imported, else its own pure-torch NMS. Beside the CPU build of torch
2.13 the only torchvision on the index (0.28, built for CUDA torch) cannot even be imported
(``operator torchvision::nms does not exist``), so there the pure-torch path runs; nothing
here imports torchvision.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import torch

from nexa_tutorials.yolo_data import CLASS_NAMES, make_detection_set

HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5}
"""Ultralytics' default gains of the box (CIoU), class (BCE) and distribution-focal losses."""

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)
"""The COCO IoU thresholds: column 0 gives mAP50, the mean over all gives mAP50-95."""

MISSING_MESSAGE = (
    'the YOLO tutorial needs Ultralytics (AGPL-3.0): pip install "nexa-nb[yolo]" '
    '(on a CPU-only machine add "torch==2.13.0" to the same command, or pip takes the CUDA torch)'
)

_OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False", "YOLO_VERBOSE": "False"}


def ultralytics_available() -> bool:
    """True when ``ultralytics`` can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ultralytics") is not None


def _ultralytics():
    """Import Ultralytics offline and quiet; a clear ImportError when it is missing."""
    for name, value in _OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    try:
        import ultralytics.nn.tasks  # noqa: F401
        import ultralytics.utils.loss  # noqa: F401
        import ultralytics.utils.metrics  # noqa: F401
        import ultralytics.utils.nms  # noqa: F401
        import ultralytics.utils.ops  # noqa: F401
    except ImportError as exc:
        raise ImportError(MISSING_MESSAGE) from exc
    import ultralytics

    return ultralytics


# --- data -------------------------------------------------------------------------------


class DetectionImages(torch.utils.data.Dataset):
    """``n`` synthetic scenes from `yolo_data.make_detection_set` (deterministic in ``seed``).

    Images are kept as uint8 (n, size, size, 3) and converted per item, so 1,000 images of
    128 px take 49 MB; a held-out set is the same call with another seed.
    """

    def __init__(self, n: int, seed: int, size: int = 128):
        self.images, self.labels = make_detection_set(n, seed, size)
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255)
        return image, torch.from_numpy(self.labels[i])


def collate(samples) -> dict[str, torch.Tensor]:
    """``[(image, labels), ...]`` -> the batch dict of Ultralytics' detection loss.

    ``img`` (B, 3, H, W) float; ``batch_idx`` (N,) float, the image each of the N boxes
    belongs to; ``cls`` (N, 1) float; ``bboxes`` (N, 4) normalised ``cx, cy, w, h``.
    """
    images = torch.stack([image for image, _ in samples])
    labels = [lab.reshape(-1, 5) for _, lab in samples]
    batch_idx = torch.cat([torch.full((len(lab),), i, dtype=torch.float32) for i, lab in enumerate(labels)])
    rows = torch.cat(labels)
    return {"img": images, "batch_idx": batch_idx, "cls": rows[:, :1].clone(), "bboxes": rows[:, 1:5].clone()}


# --- model and loss ---------------------------------------------------------------------


def make_model(cfg: str = "yolov8n.yaml", nc: int = len(CLASS_NAMES), small_boxes: bool = True, **gains: float):
    """YOLOv8n (3.0M parameters for nc=2) from the yaml inside the Ultralytics package.

    Random initial weights: nothing is downloaded. ``model.args`` holds the loss gains
    `HYP` (override with ``box=``, ``cls=``, ``dfl=``): ``v8DetectionLoss`` reads them there.
    ``small_boxes`` starts the box head at small boxes (`start_with_small_boxes`); ``False``
    keeps Ultralytics' own initialisation.
    """
    _ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    unknown = set(gains) - set(HYP)
    if unknown:
        raise TypeError(f"make_model got unknown loss gains {sorted(unknown)}; known: {sorted(HYP)}")
    model = DetectionModel(cfg, nc=nc, verbose=False)
    if small_boxes:
        start_with_small_boxes(model)
    model.args = SimpleNamespace(**{**HYP, **gains})
    model.names = dict(enumerate(CLASS_NAMES[:nc])) if nc <= len(CLASS_NAMES) else {i: str(i) for i in range(nc)}
    return model


SMALL_BOX_BIN = 1
"""The distance bin (in strides) where `start_with_small_boxes` puts each side's mass."""


def start_with_small_boxes(model) -> None:
    """Make the untrained head predict boxes a few strides wide instead of 15 strides wide.

    The head predicts, per anchor and side, a distribution over ``reg_max`` (16) distance
    bins of one stride each. Ultralytics' ``Detect.bias_init`` gives every bin the same
    bias, so before training each side sits 7.5 bins from the anchor: a box of about
    120 x 120 pixels around every stride-8 anchor. Its task-aligned assigner ranks a ground
    truth's candidate anchors by the CIoU of their predicted box, clamped at 0; for a crossarm
    of 28 x 3 pixels that CIoU is negative at every anchor (IoU 0.006 minus penalties for
    aspect ratio and centre distance: -0.024), so the crossarm gets no positive anchor, no box
    target and a class target of 0 everywhere, and it stays so once the boxes have learnt the
    shape of poles. Here each side's bias is 5 at bin `SMALL_BOX_BIN` and 0 elsewhere (about
    1.6 strides on average), so untrained boxes are about 26 pixels wide at stride 8 and both
    classes get positive anchors from the first step (`assigned_share` counts them).
    """
    head = model.model[-1]
    for branch in head.cv2:  # the box branches, one per stride; the last conv's bias is (4 * reg_max,)
        bias = branch[-1].bias.data.view(4, head.reg_max)
        bias.zero_()
        bias[:, SMALL_BOX_BIN] = 5.0


def assigned_share(model, batch) -> dict[str, float]:
    """Per class, the share of ``batch``'s true boxes to which Ultralytics' task-aligned
    assigner gives at least one positive anchor, given ``model``'s current predictions: the
    boxes its loss trains on (a box with none gets no box target and no class target).
    Runs a copy of the model in training mode, so ``model`` itself is left as it was."""
    _ultralytics()
    probe = copy.deepcopy(model).train()
    criterion = probe.init_criterion()
    with torch.no_grad():
        preds = criterion.parse_output(probe(batch["img"]))
        (fg_mask, target_gt_idx, *_), _loss, _items = criterion.get_assigned_targets_and_loss(preds, batch)
    hit = []
    for i in range(batch["img"].shape[0]):  # the loss numbers each image's boxes in batch order
        assigned = target_gt_idx[i][fg_mask[i]]
        hit += [bool((assigned == g).any()) for g in range(int((batch["batch_idx"] == i).sum()))]
    hit, classes = torch.tensor(hit, dtype=torch.float32), batch["cls"].view(-1).long()
    return {name: float(hit[classes == c].mean()) for c, name in enumerate(CLASS_NAMES) if (classes == c).any()}


def forward(model, batch):
    """The model's own training forward: given the batch dict, ``DetectionModel`` runs the
    image batch and its ``v8DetectionLoss`` and returns ``(loss * batch_size, loss_items)``:
    ``loss`` holds the gain-weighted (box, cls, dfl) terms, each normalised over the batch's
    assigned targets and then multiplied by the batch size (Ultralytics' trainer
    backpropagates that sum). Called through the (possibly wrapped) model, so DDP and ZeRO
    hooks run."""
    return model(batch)


def loss_fn(outputs, batch) -> torch.Tensor:
    """The scalar nexa_nb backpropagates: box + cls + dfl, the sum of the three losses
    Ultralytics' trainer prints (``v8DetectionLoss``'s output divided by the batch size).
    Ultralytics backpropagates the undivided sum; with AdamW only the gradient clipping
    sees the difference."""
    loss, _items = outputs
    return loss.sum() / batch["img"].shape[0]


def loss_items(outputs) -> dict[str, float]:
    """The three detached terms of `forward`'s output: box_loss, cls_loss, dfl_loss."""
    _loss, items = outputs
    return {k: float(v) for k, v in items.items()}


# --- inference and mAP ------------------------------------------------------------------


def predict(model, images: torch.Tensor, conf: float = 0.001, iou: float = 0.7, max_det: int = 100):
    """Detections per image after NMS: a list of (n, 6) tensors ``x1, y1, x2, y2, conf, cls``
    in pixels. Defaults are Ultralytics' validation settings (low ``conf`` for mAP); use
    ``conf=0.25`` or so to draw boxes."""
    _ultralytics()
    from ultralytics.utils.nms import non_max_suppression

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        model.train(was_training)
    raw = out[0] if isinstance(out, (tuple, list)) else out  # (B, 4 + nc, anchors): xywh, class scores
    return [d.float().cpu() for d in non_max_suppression(raw.float(), conf_thres=conf, iou_thres=iou, max_det=max_det)]


def match_predictions(detections: torch.Tensor, gt_cls: torch.Tensor, gt_xyxy: torch.Tensor) -> np.ndarray:
    """(n, 10) bool: detection i (sorted by confidence) is a true positive at each IoU
    threshold of `IOU_THRESHOLDS`, by Ultralytics' own greedy matching (the one its
    validator uses: each target is claimed once, by the most confident detection)."""
    _ultralytics()
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    if len(detections) == 0 or len(gt_cls) == 0:
        return np.zeros((len(detections), len(IOU_THRESHOLDS)), dtype=bool)
    iou = box_iou(gt_xyxy.float(), detections[:, :4].float())
    # BaseValidator.__init__ imports torchvision; the matching itself only reads `iouv`.
    stand_in = SimpleNamespace(iouv=IOU_THRESHOLDS)
    return BaseValidator.match_predictions(stand_in, detections[:, 5], gt_cls.float(), iou).numpy()


def image_stats(detections: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> list[dict]:
    """One ``DetMetrics.update_stats`` record per image of ``batch``."""
    _ultralytics()
    from ultralytics.utils.ops import xywh2xyxy

    height, width = batch["img"].shape[2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    records = []
    for i, det in enumerate(detections):
        here = batch["batch_idx"].cpu() == i
        gt_cls = batch["cls"].cpu()[here].view(-1).float()
        gt_xyxy = xywh2xyxy(batch["bboxes"].cpu()[here].float() * scale)
        records.append(
            {
                "tp": match_predictions(det, gt_cls, gt_xyxy),
                "conf": det[:, 4].numpy(),
                "pred_cls": det[:, 5].numpy(),
                "target_cls": gt_cls.numpy(),
                "target_img": np.unique(gt_cls.numpy()),
                "im_name": f"image-{len(records)}",
            }
        )
    return records


def map_scores(records: list[dict]) -> dict[str, float]:
    """mAP50, mAP50-95, precision and recall (means over classes), the per-class mAP50 and
    the number of images scored, computed by Ultralytics' ``DetMetrics`` (``ap_per_class``)
    from `image_stats` records."""
    _ultralytics()
    from ultralytics.utils.metrics import DetMetrics

    names = dict(enumerate(CLASS_NAMES))
    scores = DetMetrics(names=names)
    for record in records:
        scores.update_stats(record)
    scores.process()
    p, r, map50, map50_95 = (float(x) for x in scores.mean_results())
    out = {"mAP50": map50, "mAP50-95": map50_95, "precision": p, "recall": r, "images": float(len(records))}
    per_class = {int(c): float(ap) for c, ap in zip(scores.box.ap_class_index, scores.box.ap50)}
    for c, name in names.items():
        out[f"mAP50_{name}"] = float(per_class.get(c, 0.0))
    return out


def metrics(model, eval_batches) -> dict[str, float]:
    """`Task.metrics`: mAP of the held-out images after NMS.

    Runs on every rank (nexa_nb calls it so, for ZeRO-3); with several processes each rank
    sees its shard of the held-out set and the per-image records are gathered, so every rank
    returns the score of the whole set (Accelerate may repeat a few images to even out the
    shards).
    """
    records = []
    for batch in eval_batches:
        records += image_stats(predict(model, batch["img"]), batch)
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return map_scores(records)


def evaluate(model, data, batch_size: int = 32) -> dict[str, float]:
    """`metrics` of a whole dataset, outside training (e.g. ``result.trained_model()``)."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    return metrics(model, loader)


COLOURS = ("#ffd400", "#ff2d9b")
"""Box colours per class: pole yellow, crossarm magenta."""


def draw(ax, image, labels=None, detections=None, title: str | None = None) -> None:
    """Show ``image`` (CHW float tensor or HWC uint8 array) on a matplotlib ``ax`` with the
    true boxes (``labels``: YOLO rows, dashed) and/or ``detections`` (`predict` rows, solid,
    with class and confidence)."""
    from matplotlib.patches import Rectangle

    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).mul(255).clamp(0, 255).byte().numpy()
    size_y, size_x = image.shape[:2]
    ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    if labels is not None:
        for cls, cx, cy, w, h in np.asarray(labels, dtype=np.float32).reshape(-1, 5):
            ax.add_patch(
                Rectangle(
                    ((cx - w / 2) * size_x - 0.5, (cy - h / 2) * size_y - 0.5),
                    w * size_x,
                    h * size_y,
                    fill=False,
                    linestyle="--",
                    linewidth=1,
                    edgecolor=COLOURS[int(cls)],
                )
            )
    if detections is not None:
        for x1, y1, x2, y2, conf, cls in np.asarray(detections, dtype=np.float32).reshape(-1, 6):
            ax.add_patch(
                Rectangle(
                    (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, linewidth=1.2, edgecolor=COLOURS[int(cls)]
                )
            )
            ax.text(
                x1,
                y1 - 1,
                f"{CLASS_NAMES[int(cls)]} {conf:.2f}",
                color=COLOURS[int(cls)],
                fontsize=6,
                va="bottom",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "linewidth": 0},
            )


def make_task(n_train: int = 512, n_eval: int = 128, size: int = 128, train_seed: int = 0, eval_seed: int = 1):
    """The tutorial's `nexa_nb.Task`: YOLOv8n on ``n_train`` synthetic scenes, scored by
    mAP50 on ``n_eval`` held-out scenes (another seed) at the end of training."""
    from nexa_nb.task import Task

    return Task(
        model=make_model,
        train_data=DetectionImages(n_train, train_seed, size),
        eval_data=DetectionImages(n_eval, eval_seed, size),
        collate_fn=collate,
        forward=forward,
        loss_fn=loss_fn,
        metrics=metrics,
        name="yolov8n-poles",
    )


__all__ = [
    "CLASS_NAMES",
    "HYP",
    "DetectionImages",
    "collate",
    "make_model",
    "start_with_small_boxes",
    "assigned_share",
    "forward",
    "loss_fn",
    "loss_items",
    "draw",
    "predict",
    "match_predictions",
    "image_stats",
    "map_scores",
    "metrics",
    "evaluate",
    "make_task",
    "ultralytics_available",
]
