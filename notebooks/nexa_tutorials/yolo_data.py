"""Synthetic detection data: utility poles and crossarms in YOLO format (numpy only).

Each image is a sky-and-ground scene with clouds, trees and houses as clutter, one to
three poles (tall vertical bars, wood-brown or concrete-grey, shaded across their width)
of varied height and depth, each with zero to two crossarms (horizontal bars near the top)
and sagging wires between neighbouring poles. Boxes are tight around the drawn pixels.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ["pole", "crossarm"]
POLE, CROSSARM = 0, 1

_SKIES = [  # (zenith, horizon) colours: clear, overcast, dusk
    ((70, 130, 200), (170, 200, 230)),
    ((150, 155, 165), (205, 205, 210)),
    ((60, 70, 130), (230, 150, 90)),
]
_GROUNDS = [(70, 120, 50), (150, 130, 80), (90, 90, 95), (110, 85, 60)]
_WOOD = (105, 70, 40)
_CONCRETE = (150, 150, 145)


def make_detection_set(n: int, seed: int, size: int = 128):
    """Returns ``(images, labels)``.

    ``images``: uint8 array (n, size, size, 3). ``labels``: one float32 array (k, 5) per
    image, rows ``[class, cx, cy, w, h]`` with coordinates as fractions of the image side
    (YOLO format); classes index `CLASS_NAMES`. Image i depends only on ``(seed, i)``,
    so a held-out set is just another seed.
    """
    images = np.empty((n, size, size, 3), np.uint8)
    labels = []
    for i in range(n):
        images[i], _, boxes = render_scene(np.random.default_rng([seed, i]), size)
        labels.append(boxes)
    return images, labels


def render_scene(rng: np.random.Generator, size: int = 128):
    """One scene: ``(image, background, boxes)``.

    ``background`` is the same scene with no pole, crossarm or wire drawn, which lets a
    test check that every box covers drawn pixels.
    """
    background, horizon = _background(rng, size)
    image = background.astype(np.float32)
    poles = _place_poles(rng, size, horizon)
    _draw_wires(image, rng, poles)
    boxes = []
    for pole in poles:
        boxes += _draw_pole(image, rng, pole, size)
    return np.clip(image, 0, 255).astype(np.uint8), background, np.array(boxes, np.float32).reshape(-1, 5)


def _jitter(rng, colour, amount=15.0) -> np.ndarray:
    return np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3)


def _background(rng, size) -> tuple[np.ndarray, int]:
    """Sky gradient over ground, with clutter and sensor noise; returns the horizon row too."""
    horizon = int(size * rng.uniform(0.55, 0.85))
    rows = np.arange(size, dtype=np.float32)[:, None, None]
    zenith, haze = _SKIES[int(rng.integers(len(_SKIES)))]
    t = np.clip(rows / horizon, 0, 1)
    sky = _jitter(rng, zenith) * (1 - t) + _jitter(rng, haze) * t
    ground_colour = _jitter(rng, _GROUNDS[int(rng.integers(len(_GROUNDS)))], 20)
    ground = ground_colour * (0.8 + 0.3 * (rows - horizon) / size)
    image = np.where(rows < horizon, sky, ground) * np.ones((1, size, 1), np.float32)

    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(0, 4))):  # clouds: soft light ellipses in the sky
        cy, cx = rng.uniform(0, horizon * 0.6), rng.uniform(0, size)
        ry, rx = rng.uniform(3, 8) * size / 128, rng.uniform(10, 25) * size / 128
        alpha = np.clip(1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0, 1)[..., None] * 0.7
        image = image * (1 - alpha) + 240 * alpha
    for _ in range(int(rng.integers(0, 3))):  # houses: low wide blocks on the horizon
        w, h = int(rng.uniform(15, 35) * size / 128), int(rng.uniform(8, 16) * size / 128)
        x = int(rng.integers(0, size - w))
        image[horizon - h : horizon + 2, x : x + w] = _jitter(rng, (170, 150, 130), 40)
        image[horizon - h - 3 : horizon - h, x : x + w] = _jitter(rng, (90, 50, 45), 20)
    for _ in range(int(rng.integers(0, 5))):  # trees: dark green blobs on the horizon
        rx, ry = rng.uniform(6, 18) * size / 128, rng.uniform(8, 22) * size / 128
        cy, cx = horizon - ry * rng.uniform(0.3, 0.8), rng.uniform(0, size)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = _jitter(rng, (40, 80, 35), 15)
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), horizon


def _place_poles(rng, size, horizon) -> list[dict]:
    """Pole geometry, left to right: each stands on the ground below the horizon (nearer
    ones may run off the bottom edge), and no two poles' extents (crossarms included) touch."""
    poles = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            height = int(size * rng.uniform(0.35, 0.9))
            bottom = int(rng.uniform(horizon + 2, 1.15 * size))
            top = max(1, bottom - height)
            height = bottom - top
            width = max(2, round(height * rng.uniform(0.045, 0.08)))
            arm_len = max(width + 4, round(height * rng.uniform(0.28, 0.45)))
            half = arm_len // 2 + 3  # room for the crossarm's offset from the pole axis
            cx = int(rng.integers(half, size - half))
            extent = (cx - half, cx + half)
            if all(extent[1] + 2 < p["extent"][0] or p["extent"][1] + 2 < extent[0] for p in poles):
                break
        else:
            continue
        arm_y = [top + round(height * rng.uniform(0.03, 0.08))]
        n_arms = int(rng.choice([0, 1, 2], p=[0.1, 0.6, 0.3]))
        if n_arms == 2:
            arm_y.append(arm_y[0] + round(height * rng.uniform(0.08, 0.15)))
        poles.append(
            {
                "x0": cx - width // 2,
                "x1": cx - width // 2 + width,
                "top": top,
                "bottom": min(bottom, size),
                "arm_y": arm_y[:n_arms],
                "arm_len": arm_len,
                "arm_thick": max(2, round(width * rng.uniform(0.5, 0.8))),
                "extent": extent,
                "cx": cx,
            }
        )
    return sorted(poles, key=lambda p: p["cx"])


def _draw_wires(image, rng, poles) -> None:
    """Thin sagging wires from each pole's top crossarm to the next pole's."""
    size = image.shape[0]
    ends = [(p["cx"] - p["arm_len"] // 2, p["cx"] + p["arm_len"] // 2, p["arm_y"][0]) for p in poles if p["arm_y"]]
    colour = _jitter(rng, (50, 50, 55), 10)
    for (_, x_a, y_a), (x_b, _, y_b) in zip(ends, ends[1:]):
        sag = rng.uniform(0.02, 0.08) * (x_b - x_a)
        xs = np.arange(x_a, x_b)
        t = (xs - x_a) / max(1, x_b - x_a)
        ys = np.round(y_a + (y_b - y_a) * t + 4 * sag * t * (1 - t)).astype(int)
        keep = (ys >= 0) & (ys < size)
        image[ys[keep], xs[keep]] = colour


def _draw_pole(image, rng, pole, size) -> list[list[float]]:
    x0, x1, top, bottom = pole["x0"], pole["x1"], pole["top"], pole["bottom"]
    base = _jitter(rng, _WOOD if rng.random() < 0.65 else _CONCRETE, 20)
    shade = np.linspace(1.15, 0.75, x1 - x0, dtype=np.float32)[None, :, None]  # lit from the left
    texture = rng.normal(0, 6, (bottom - top, x1 - x0, 1)).astype(np.float32)
    image[top:bottom, x0:x1] = base * shade + texture
    boxes = [_yolo_box(POLE, x0, top, x1, bottom, size)]

    arm_colour = _jitter(rng, _WOOD, 20)
    for y in pole["arm_y"]:
        ax0 = pole["cx"] - pole["arm_len"] // 2 + int(rng.integers(-2, 3))
        ax1 = ax0 + pole["arm_len"]
        ax0, ax1 = max(0, ax0), min(size, ax1)
        y1 = min(size, y + pole["arm_thick"])
        image[y:y1, ax0:ax1] = arm_colour * np.linspace(1.1, 0.85, y1 - y, dtype=np.float32)[:, None, None]
        boxes.append(_yolo_box(CROSSARM, ax0, y, ax1, y1, size))
    return boxes


def _yolo_box(cls, x0, y0, x1, y1, size) -> list[float]:
    """Pixel box [x0, x1) x [y0, y1) as [class, cx, cy, w, h] normalised by the side."""
    return [cls, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size]
