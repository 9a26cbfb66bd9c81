#!/usr/bin/env python
"""Does `kdsb explain` point at the cancer? Peaks of Grad-CAM against the phantoms' truth.

Runs on a finished `kdsb demo WORKDIR` (or `make demo`: WORKDIR = demo_work): the demo's
classifier (`runs/classifier/classifier.keras`) explains every positive patient of the held-out
test cohort (`volumes/test`, truth in `test_cohort/truth`). A patient counts as found when the
peak (`explain.peak_voxel`: the middle of the hottest region inside the lung mask) lies inside
its largest nodule (the one that makes the label, radius >= 8 mm) or within 10 mm of its
surface. Prints one row per patient and the
fraction found; the chance level is the fraction of the lung volume within that reach.

Usage: python benchmarks/explain_peaks.py WORKDIR [--method gradcam|occlusion]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdsb.evaluation.explain import explain_cohort  # noqa: E402
from kdsb.io import volumes  # noqa: E402
from kdsb.io.tables import read_labels  # noqa: E402
from kdsb.phantoms.cohort import load_truth  # noqa: E402
from kdsb.phantoms.layout import labels_path  # noqa: E402

REACH_MM = 10.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args(argv)
    work = args.workdir
    labels = read_labels(labels_path(work / "test_cohort"))
    positives = [pid for pid, label in sorted(labels.items()) if label == 1]
    model = work / "runs" / "classifier" / "classifier.keras"
    with tempfile.TemporaryDirectory() as out:
        found, failed = explain_cohort(work / "volumes" / "test", [model], out, ids=positives,
                                       method=args.method)
    if failed:
        raise SystemExit("; ".join(failed.values()))
    print(f"{'id':<14}{'p':>7}{'peak→nodule mm':>16}{'radius':>8}{'found':>7}{'chance':>8}")
    hits, chances = [], []
    for peak in found:
        truth = load_truth(work / "test_cohort", peak.patient_id)
        nodule = max(truth.nodules, key=lambda n: n.radius_mm)
        distance = float(np.linalg.norm(np.subtract(peak.peak_mm, nodule.center_mm)))
        hit = distance <= nodule.radius_mm + REACH_MM
        volume = volumes.read_volume(volumes.volume_path(work / "volumes" / "test",
                                                         peak.patient_id))
        grid = np.stack(np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(
            volume.origin, volume.spacing, volume.hu.shape, strict=True)], indexing="ij"), -1)
        lung = volume.lung_mask > 0
        near = np.linalg.norm(grid[lung] - np.array(nodule.center_mm), axis=1)
        chance = float(np.mean(near <= nodule.radius_mm + REACH_MM))
        hits.append(hit)
        chances.append(chance)
        print(f"{peak.patient_id:<14}{peak.probability:>7.3f}{distance:>16.1f}"
              f"{nodule.radius_mm:>8.1f}{'yes' if hit else 'no':>7}{chance:>8.3f}")
    print(f"\n{args.method}: peak within {REACH_MM:g} mm of the cancer nodule for "
          f"{sum(hits)} / {len(hits)} positive patients ({np.mean(hits):.0%}); chance "
          f"{np.mean(chances):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
