"""Tutorial 02's task builder: YOLOv8n (Ultralytics) detection of poles and crossarms.

Needs the ``yolo`` extra (Ultralytics, AGPL-3.0), which lives in its own environment on
the CPU-only machines (see the Makefile); skipped where Ultralytics cannot be imported.
"""

from __future__ import annotations

import socket
import sys

import pytest
import torch

from nexa_tutorials import yolo

pytestmark = pytest.mark.skipif(
    not yolo.ultralytics_available(),
    reason="Ultralytics is not installed here: the YOLO tutorial's tests run in the yolo environment "
    '(pip install "nexa-nb[yolo]"; on the CPU machines, make builds .venv-yolo)',
)


@pytest.fixture(scope="module")
def data():
    return yolo.DetectionImages(6, seed=0, size=128)


@pytest.fixture(scope="module")
def batch(data):
    return yolo.collate([data[i] for i in range(4)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return yolo.make_model()


def test_dataset_items(data):
    image, labels = data[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert labels.dtype == torch.float32 and labels.shape[1] == 5 and len(labels) >= 1
    assert set(labels[:, 0].tolist()) <= {0.0, 1.0}


def test_collate_builds_the_batch_dict_of_the_ultralytics_loss(data, batch):
    counts = [len(data[i][1]) for i in range(4)]
    n = sum(counts)
    assert set(batch) == {"img", "batch_idx", "cls", "bboxes"}
    assert batch["img"].shape == (4, 3, 128, 128)
    assert batch["batch_idx"].shape == (n,) and batch["cls"].shape == (n, 1) and batch["bboxes"].shape == (n, 4)
    assert batch["batch_idx"].tolist() == [float(i) for i, c in enumerate(counts) for _ in range(c)]
    rows = torch.cat([data[i][1] for i in range(4)])
    assert torch.equal(batch["cls"][:, 0], rows[:, 0]) and torch.equal(batch["bboxes"], rows[:, 1:])


def test_collate_accepts_an_image_without_boxes(data):
    empty = (data[0][0], torch.zeros(0, 5))
    out = yolo.collate([empty, data[1]])
    assert out["batch_idx"].tolist() == [1.0] * len(data[1][1])


def test_the_model_is_yolov8n_from_its_yaml_with_two_classes(model):
    head = model.model[-1]
    assert type(model).__name__ == "DetectionModel" and type(head).__name__ == "Detect"
    assert head.nc == 2 and model.names == {0: "pole", 1: "crossarm"}
    assert sum(p.numel() for p in model.parameters()) == 3_011_238
    assert vars(model.args) == yolo.HYP


def test_loss_is_a_finite_scalar_per_image_and_backpropagates(model, batch):
    model.train()
    model.zero_grad()
    outputs = yolo.forward(model, batch)
    loss = yolo.loss_fn(outputs, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    items = yolo.loss_items(outputs)
    assert set(items) == {"box_loss", "cls_loss", "dfl_loss"}
    # v8DetectionLoss returns each term times the batch size; loss_fn divides it out.
    assert loss.item() == pytest.approx(sum(items.values()), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_untrained_boxes_are_small_enough_for_crossarms_to_get_positive_anchors():
    """The assigner ranks anchors by CIoU clamped at 0: against Ultralytics' untrained boxes
    (about 120 px square at 128 px) a thin crossarm's CIoU is negative everywhere, so it gets
    no positive anchor and is never learnt; `start_with_small_boxes` fixes the start."""
    data = yolo.DetectionImages(16, seed=0, size=128)
    batch = yolo.collate([data[i] for i in range(16)])
    torch.manual_seed(0)
    stock = yolo.make_model(small_boxes=False)
    torch.manual_seed(0)
    small = yolo.make_model()
    widths = {}
    for name, model in (("stock", stock), ("small", small)):
        boxes = yolo.predict(model, batch["img"][:2], conf=0.0, max_det=300)
        widths[name] = float(torch.cat(boxes)[:, 2:4].sub(torch.cat(boxes)[:, 0:2]).median())
    assert widths["stock"] > 90 and 12 < widths["small"] < 60
    assert yolo.assigned_share(stock, batch)["crossarm"] < 0.1
    share = yolo.assigned_share(small, batch)
    assert share["crossarm"] > 0.6 and share["pole"] > 0.9


def test_assigned_share_leaves_the_model_as_it_was(model, batch):
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yolo.assigned_share(model, batch)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _raw(boxes_xywh, scores):
    """One image's raw head output (1, 4 + nc, anchors) from pixel xywh boxes and class scores."""
    return torch.cat([torch.tensor(boxes_xywh, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32)], 1).T[
        None
    ]


def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    from ultralytics.utils.nms import non_max_suppression

    raw = _raw(
        [[50, 50, 20, 40], [51, 50, 20, 40], [50, 50, 20, 40], [100, 100, 10, 10]],
        [[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.6, 0.0]],
    )
    out = non_max_suppression(raw, conf_thres=0.25, iou_thres=0.5)[0]
    # The near-duplicate pole (IoU 0.95 with a better one) goes; the crossarm at the same
    # place stays (NMS is per class); the distant box stays.
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert out[:, 5].tolist() == [0.0, 1.0, 0.0]
    assert out[0, :4].tolist() == pytest.approx([40, 30, 60, 70])
    assert "torchvision" not in sys.modules  # the pure-torch NMS ran


def test_predict_wraps_model_inference_and_nms(model, batch):
    model.train()
    dets = yolo.predict(model, batch["img"][:2], conf=0.0, max_det=7)
    assert model.training  # restored
    assert len(dets) == 2 and all(d.shape[1] == 6 and len(d) <= 7 for d in dets)


def _perfect(batch, shift=0.0):
    from ultralytics.utils.ops import xywh2xyxy

    dets = []
    for i in range(batch["img"].shape[0]):
        here = batch["batch_idx"] == i
        xyxy = xywh2xyxy(batch["bboxes"][here] * 128) + shift
        dets.append(torch.cat([xyxy, torch.ones(len(xyxy), 1), batch["cls"][here]], 1))
    return dets


def test_map_of_perfect_predictions_is_the_maximum(batch):
    scores = yolo.map_scores(yolo.image_stats(_perfect(batch), batch))
    # Ultralytics' AP integrates the interpolated precision-recall curve with the trapezoid
    # rule over 101 recall points, whose last segment ends at precision 0: a perfect detector
    # scores 0.995, its ceiling (the 1.0 of COCO's own tool).
    assert scores["mAP50"] == pytest.approx(0.995) and scores["mAP50-95"] == pytest.approx(0.995)
    assert scores["precision"] == pytest.approx(1.0) and scores["recall"] == pytest.approx(1.0)
    assert scores["mAP50_pole"] == pytest.approx(0.995) and scores["mAP50_crossarm"] == pytest.approx(0.995)


def test_map_counts_misses_wrong_classes_and_duplicates(batch):
    perfect = _perfect(batch)
    wrong_class = [torch.cat([d[:, :5], 1 - d[:, 5:]], 1) for d in perfect]
    assert yolo.map_scores(yolo.image_stats(wrong_class, batch))["mAP50"] == 0.0
    nothing = [torch.zeros(0, 6) for _ in perfect]
    assert yolo.map_scores(yolo.image_stats(nothing, batch))["mAP50"] == 0.0
    # A duplicate of every box, less confident, is a false positive after every true one:
    # precision stays 1 up to full recall, so AP50 is unchanged.
    duplicated = [torch.cat([d, torch.cat([d[:, :4], d[:, 4:5] * 0.5, d[:, 5:]], 1)]) for d in perfect]
    assert yolo.map_scores(yolo.image_stats(duplicated, batch))["mAP50"] == pytest.approx(0.995)
    # Half the images without detections: recall 1/2 at most.
    half = [d if i % 2 == 0 else torch.zeros(0, 6) for i, d in enumerate(perfect)]
    got = yolo.map_scores(yolo.image_stats(half, batch))
    assert 0.2 < got["mAP50"] < 0.75 and got["precision"] == pytest.approx(1.0)


def test_nothing_reaches_for_the_network(monkeypatch, batch):
    """Model, loss, NMS and metrics with every socket connection refused."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    m = yolo.make_model()
    yolo.loss_fn(yolo.forward(m, batch), batch).backward()
    yolo.map_scores(yolo.image_stats(yolo.predict(m, batch["img"]), batch))


@pytest.mark.slow
def test_a_real_nexa_nb_run_trains_and_scores_the_task(quiet):
    import nexa_nb

    task = yolo.make_task(n_train=8, n_eval=4, size=64)
    result = nexa_nb.train(task, sinks=[quiet], procs=1, batch_size=4, max_steps=3, lr=1e-3)
    assert result.status == "completed" and len(result.history) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert set(result.eval_metrics) >= {"loss", "mAP50", "mAP50-95", "precision", "recall", "images"}
    assert {"mAP50_pole", "mAP50_crossarm"} <= set(result.eval_metrics)
    assert 0.0 <= result.eval_metrics["mAP50"] <= 1.0 and result.eval_metrics["images"] == 4
    trained = result.trained_model()
    scores = yolo.evaluate(trained, task.eval_data, batch_size=4)
    assert scores["mAP50"] == pytest.approx(result.eval_metrics["mAP50"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_score_the_whole_heldout_set(quiet):
    """Each rank evaluates its shard; the metric gathers the records of both."""
    import nexa_nb

    task = yolo.make_task(n_train=16, n_eval=8, size=64)
    result = nexa_nb.train(task, sinks=[quiet], procs=2, batch_size=4, max_steps=2, lr=1e-3)
    assert result.distributed_type == "MULTI_CPU" and result.num_processes == 2
    assert result.eval_metrics["images"] == 8
