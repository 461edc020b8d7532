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


def draw_sample(rng: np.random.RandomState, size: int = 320, max_objects: int = 4):
    """One image (uint8 BGR) and its boxes ``[x, y, w, h]`` with category indices."""
    import cv2
    image = _background(rng, size)
    boxes, labels = [], []
    for _ in range(rng.randint(1, max_objects + 1)):
        label = int(rng.randint(len(CATEGORIES)))
        side = int(rng.randint(size // 10, size // 3))
        x, y = int(rng.randint(0, size - side)), int(rng.randint(0, size - side))
        colour = tuple(float(v) for v in rng.randint(0, 256, 3))
        if label == 0:
            cv2.circle(image, (x + side // 2, y + side // 2), side // 2, colour, -1)
        elif label == 1:
            cv2.rectangle(image, (x, y), (x + side - 1, y + side - 1), colour, -1)
        else:
            points = np.array([[x + side // 2, y], [x, y + side - 1], [x + side - 1, y + side - 1]], np.int32)
            cv2.fillPoly(image, [points], colour)
        boxes.append([float(x), float(y), float(side), float(side)])
        labels.append(label)
    return np.clip(image, 0, 255).astype("uint8"), boxes, labels


def write_split(root: str, split: str, count: int, seed: int, size: int = 320) -> str:
    """Write ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``; returns the json path."""
    import cv2
    rng = np.random.RandomState(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for i in range(count):
        image, boxes, labels = draw_sample(rng, size)
        name = f"{split}_{i:05d}.jpg"
        cv2.imwrite(os.path.join(image_dir, name), image)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for box, label in zip(boxes, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]}, f)
    return path
