"""A small generated detection dataset: coloured shapes on textured backgrounds, COCO format.

Used to train PP-YOLOE for a few minutes on CPU so that accuracy parity
(training form vs ppfuse export) is measured on a model that detects
something, and to give the quick start a demo image. Nothing is downloaded
and nothing is committed: the images are drawn from a seed.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

CATEGORIES = ["circle", "square", "triangle"]

# The "hard" variant (issue 14: a setting where int8 can cost accuracy): eight classes, five of which differ
# from a basic shape only by a detail (a hole, an outline, a rotation, an aspect ratio), small objects (6 to 80
# px at 320), up to 14 per image, overlapping and occluding each other, colours drawn near the background's.
HARD_CATEGORIES = ["circle", "square", "triangle", "ring", "outlined square", "diamond", "cross", "bar"]

VARIANTS = {"easy": CATEGORIES, "hard": HARD_CATEGORIES}


def categories(variant: str = "easy") -> List[str]:
    """The class names of a variant (``easy``: the original three, ``hard``: eight)."""
    if variant not in VARIANTS:
        raise ValueError(f"shapes variant {variant!r}: use one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """Smooth colour gradient + noise + random lines: texture, so shapes are not trivially found."""
    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    image = np.zeros((size, size, 3), "float32")
    for c in range(3):
        a, b, base = rng.uniform(-80, 80, 2).tolist() + [rng.uniform(60, 190)]
        image[..., c] = base + a * xx + b * yy
    image += rng.normal(0, 12, image.shape)
    import cv2
    for _ in range(rng.randint(3, 9)):
        p1, p2 = tuple(int(v) for v in rng.randint(0, size, 2)), tuple(int(v) for v in rng.randint(0, size, 2))
        cv2.line(image, p1, p2, tuple(float(v) for v in rng.uniform(0, 255, 3)), int(rng.randint(1, 4)))
    return image


def _draw(image: np.ndarray, name: str, x: int, y: int, w: int, h: int, colour) -> None:
    """Draw class ``name`` filling the box ``x, y, w, h`` (pixels) of ``image`` in place."""
    import cv2
    cx, cy = x + w // 2, y + h // 2
    line = max(1, min(w, h) // 6)
    if name == "circle":
        cv2.circle(image, (cx, cy), min(w, h) // 2, colour, -1)
    elif name == "square":
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, -1)
    elif name == "triangle":
        cv2.fillPoly(image, [np.array([[cx, y], [x, y + h - 1], [x + w - 1, y + h - 1]], np.int32)], colour)
    elif name == "ring":
        cv2.ellipse(image, (cx, cy), (w // 2, h // 2), 0, 0, 360, colour, -1)
        cv2.ellipse(image, (cx, cy), (max(1, w // 4), max(1, h // 4)), 0, 0, 360,
                    tuple(float(v) for v in image[cy, cx]), -1)
    elif name == "outlined square":
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, line)
    elif name == "diamond":
        cv2.fillPoly(image, [np.array([[cx, y], [x + w - 1, cy], [cx, y + h - 1], [x, cy]], np.int32)], colour)
    elif name == "cross":
        cv2.rectangle(image, (cx - line, y), (cx + line, y + h - 1), colour, -1)
        cv2.rectangle(image, (x, cy - line), (x + w - 1, cy + line), colour, -1)
    elif name == "bar":
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, -1)
    else:
        raise ValueError(f"no drawing for shape class {name!r}")


def draw_sample(rng: np.random.RandomState, size: int = 320, max_objects: int = 4, variant: str = "easy"):
    """One image (uint8 BGR) and its boxes ``[x, y, w, h]`` with category indices."""
    names = categories(variant)
    image = _background(rng, size)
    boxes, labels = [], []
    hard = variant == "hard"
    count = rng.randint(2, 15) if hard else rng.randint(1, max_objects + 1)
    for _ in range(count):
        label = int(rng.randint(len(names)))
        if hard:
            side = int(np.exp(rng.uniform(np.log(6), np.log(size // 4))))  # log-uniform: many small ones
        else:
            side = int(rng.randint(size // 10, size // 3))
        w = h = side
        if names[label] == "bar":  # elongated: 3-5 times longer than wide, either way
            long_side = min(size - 1, side * int(rng.randint(3, 6)))
            w, h = (long_side, side) if rng.rand() < 0.5 else (side, long_side)
        end = 1 if hard else 0  # (the easy variant draws as it always has)
        x, y = int(rng.randint(0, size - w + end)), int(rng.randint(0, size - h + end))
        if hard and rng.rand() < 0.5:  # low contrast: near the background's colour there
            base = image[min(size - 1, y + h // 2), min(size - 1, x + w // 2)]
            colour = tuple(float(np.clip(v + rng.choice([-1, 1]) * rng.uniform(25, 50), 0, 255)) for v in base)
        else:
            colour = tuple(float(v) for v in rng.randint(0, 256, 3))
        _draw(image, names[label], x, y, w, h, colour)
        boxes.append([float(x), float(y), float(w), float(h)])
        labels.append(label)
    return np.clip(image, 0, 255).astype("uint8"), boxes, labels


def write_split(root: str, split: str, count: int, seed: int, size: int = 320, variant: str = "easy") -> str:
    """Write ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``; returns the json path.

    The json's ``info.ppfuse_shapes_variant`` names the variant, so a split of another variant is told apart."""
    names = categories(variant)
    import cv2
    rng = np.random.RandomState(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for i in range(count):
        image, boxes, labels = draw_sample(rng, size, variant=variant)
        name = f"{split}_{i:05d}.jpg"
        cv2.imwrite(os.path.join(image_dir, name), image)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for box, label in zip(boxes, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump({"info": {"ppfuse_shapes_variant": variant}, "images": images, "annotations": annotations,
                   "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}, f)
    return path
