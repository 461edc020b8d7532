"""Whether one export gives the same detections in every runtime x precision on real images
(``tools/compare_runtimes.py``).

The reference is Paddle Inference fp32. Every other runtime and precision that can
run here (its extra installed, its file written, bf16 on a CPU with bf16
instructions) runs the same images through :class:`ppfuse.deploy.inference.Detector`;
each of its detections above the threshold is paired with the reference's
(:func:`match_detections`). What cannot run is a row with the reason.

Random weights make this comparison meaningless: their scores saturate, and NMS
keeps an arbitrary few hundred of thousands of tied boxes, so runtimes that agree
to 1e-5 before NMS keep different boxes. Compare a trained export.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ppfuse import runtime as runtimes
from ppfuse.deploy.inference import Detections, Detector, split_detections
from ppfuse.measure.results import table

REFERENCE = ("paddle", "fp32")
# a detection pairs with one of the same class whose box corners are this close (pixels of the image)
DEFAULT_BOX_TOLERANCE = 1.0


@dataclass
class Match:
    """How a candidate's detections pair with the reference's on one or more images."""
    reference: int = 0  # detections of the reference
    candidate: int = 0  # detections of the candidate
    matched: int = 0  # pairs: same class, box corners within the tolerance
    max_box_diff: float = 0.0  # pixels, over the pairs
    max_score_diff: float = 0.0  # over the pairs
    unmatched_scores: List[float] = field(default_factory=list)  # of detections left without a pair, both sides

    def add(self, other: "Match") -> None:
        self.reference += other.reference
        self.candidate += other.candidate
        self.matched += other.matched
        self.max_box_diff = max(self.max_box_diff, other.max_box_diff)
        self.max_score_diff = max(self.max_score_diff, other.max_score_diff)
        self.unmatched_scores += other.unmatched_scores

    @property
    def same(self) -> bool:
        return self.matched == self.reference == self.candidate

    @property
    def cell(self) -> str:
        """The pairing as a table cell."""
        return f"{self.matched} of {self.reference} paired ({self.candidate} found)"


def match_detections(reference: Detections, candidate: Detections,
                     box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> Match:
    """Pair detections one to one: in the reference's score order, each takes the closest unpaired
    candidate of its class (largest corner difference), if within ``box_tolerance`` pixels."""
    result = Match(len(reference.scores), len(candidate.scores))
    free = np.ones(len(candidate.scores), bool)
    for i in np.argsort(-reference.scores, kind="stable"):
        options = np.flatnonzero(free & (candidate.classes == reference.classes[i]))
        if len(options) == 0:
            result.unmatched_scores.append(float(reference.scores[i]))
            continue
        diffs = np.abs(candidate.boxes[options] - reference.boxes[i]).max(axis=1)
        best = int(np.argmin(diffs))
        if diffs[best] > box_tolerance:
            result.unmatched_scores.append(float(reference.scores[i]))
            continue
        j = options[best]
        free[j] = False
        result.matched += 1
        result.max_box_diff = max(result.max_box_diff, float(diffs[best]))
        result.max_score_diff = max(result.max_score_diff, float(abs(candidate.scores[j] - reference.scores[i])))
    result.unmatched_scores += [float(s) for s in candidate.scores[free]]
    return result


def match_outputs(reference: Detections, outputs: Sequence[np.ndarray],
                  box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> Match:
    """A runtime's raw NMS outputs ``[bbox, bbox_num]`` (one image) paired with ``reference``
    (:func:`match_detections`)."""
    return match_detections(reference, split_detections(outputs[0], outputs[1])[0], box_tolerance)


@dataclass
class Row:
    runtime: str
    precision: str
    ran: str = ""  # the runtime's own account of what ran (PrecisionReport.line)
    detections: int = 0
    match: Optional[Match] = None  # None for the reference
    error: Optional[str] = None  # why this runtime x precision did not run


def combinations() -> List[Tuple[str, str]]:
    """Every CPU runtime x precision, the reference first."""
    return [(name, precision) for name in runtimes.RUNTIMES for precision in runtimes.CPU_PRECISIONS[name]]


def compare(model_dir: str, images: Sequence[np.ndarray], threshold: float, threads: int = 2,
            box_tolerance: float = DEFAULT_BOX_TOLERANCE, log=lambda line: None) -> Tuple[List[Row], bool]:
    """Run ``images`` (BGR) through every runtime x precision; rows against the Paddle Inference fp32
    reference, and whether the export has random weights."""
    reference = Detector(model_dir, runtimes.RuntimeOptions(cpu_threads=threads), runtime="paddle")
    expected = [reference.predict(image).above(threshold) for image in images]
    rows = []
    for name, precision in combinations():
        row = Row(name, precision)
        rows.append(row)
        try:
            if (name, precision) == REFERENCE:
                detector, found = reference, expected
            else:
                detector = Detector(model_dir, runtimes.RuntimeOptions(precision=precision, cpu_threads=threads),
                                    runtime=name)
                found = [detector.predict(image).above(threshold) for image in images]
            row.detections = sum(len(d.scores) for d in found)
            row.ran = detector.runtime.confirm_precision(reference.preprocess(images[0])).line()
        except Exception as exc:  # a runtime that cannot run here is a row, not the end of the comparison
            row.error = str(exc).strip().splitlines()[0][:200]
            log(f"{name} {precision}: not run: {row.error}")
            continue
        if detector is not reference:
            row.match = Match()
            for want, got in zip(expected, found):
                row.match.add(match_detections(want, got, box_tolerance))
            log(f"{name} {precision}: {row.match.matched} of {row.match.reference} detections paired")
    return rows, reference.random_weights


def markdown(rows: List[Row], model_dir: str, count: int, threshold: float, box_tolerance: float,
             random_weights: bool) -> str:
    lines = [f"CPU: {runtimes.cpu_description()}", "",
             f"`{model_dir}`, {count} images, score threshold {threshold}; reference: Paddle Inference fp32. "
             f"A pair: same class, box corners within {box_tolerance:g} px.", ""]
    if random_weights:
        lines += ["**Random weights**: scores saturate and NMS keeps an arbitrary subset of tied boxes, so "
                  "rows differ even where the networks agree; compare a trained export.", ""]
    rows_out = []
    for row in rows:
        if row.error:
            rows_out.append([row.runtime, row.precision, "-", "-", "-", "-", "-", f"not run: {row.error}"])
        elif row.match is None:
            rows_out.append([row.runtime, row.precision, row.detections, "reference", "-", "-", "-", row.ran])
        else:
            m = row.match
            unpaired = f"{len(m.unmatched_scores)}, {max(m.unmatched_scores):.3f}" if m.unmatched_scores else "0"
            rows_out.append([row.runtime, row.precision, f"{m.candidate} ({m.reference})", m.matched,
                             f"{m.max_box_diff:.3g}", f"{m.max_score_diff:.2g}", unpaired, row.ran])
    lines.append(table(["runtime", "precision", "detections (reference)", "paired", "max box diff px",
                        "max score diff", "unpaired, highest score", "what ran"], rows_out, "llrrrrrl"))
    return "\n".join(lines) + "\n"


def to_data(rows: List[Row], model_dir: str, count: int, threshold: float, box_tolerance: float,
            random_weights: bool) -> dict:
    """The comparison as the result file's JSON holds it."""
    return {"model_dir": model_dir, "images": count, "threshold": threshold, "box_tolerance": box_tolerance,
            "random_weights": random_weights, "reference": "/".join(REFERENCE), "rows": rows}
