#!/usr/bin/env python
"""Does the QC's lesion view show the cancer? `find_lesion` against implanted real anatomy.

Per seed, `kdsb synth --base CT` implants lesions into varied copies of a real chest CT (half
the patients with a cancer lesion, every patient with small nodules) and `kdsb preprocess` makes
their volumes (reused from WORKDIR when there). For each patient with a cancer lesion the
benchmark asks which soft-tissue component the QC outlines: today's rule (`find_lesion`: the
highest volume / elongation²) and the former one measured in the same run (the largest
component after the same vessel opening). A component points at the cancer when at least
`HIT_FRACTION` of its voxels lie within the lesion's radius + `HIT_REACH_MM` of its centre.
Ground-glass lesions (-700 to -300 HU) hold no soft tissue, so no rule can point at them: they
are counted apart. Prints one row per cancer patient and a summary per seed.

Usage: python benchmarks/qc_lesion.py WORKDIR [--base CT] [--seeds 101 202]
       [--patients 16 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdsb import cli  # noqa: E402
from kdsb.io import volumes  # noqa: E402
from kdsb.phantoms.cohort import truth_paths  # noqa: E402
from kdsb.preprocessing.qc import lesion as qc_lesion  # noqa: E402
from tests.realdata import reference_files  # noqa: E402

HIT_FRACTION = 0.3  # share of the outlined component's voxels that must lie in the lesion
HIT_REACH_MM = 2.0  # beyond the lesion's nominal radius (spicules, lobulation)
NO_SOFT_TISSUE_KINDS = ("ground_glass",)


def _cohort(work: Path, base: Path, seed: int, patients: int, workers: int) -> Path:
    """The seed's implanted cohort and its volumes under `work`, made unless already there."""
    root = work / f"seed_{seed}"
    if not (root / "volumes" / "manifest.csv").is_file():
        for argv in (["synth", str(root / "cohort"), "--base", str(base), "--patients",
                      str(patients), "--seed", str(seed), "--overwrite", "-q"],
                     ["preprocess", str(root / "cohort" / "dicom"), str(root / "volumes"),
                      "--workers", str(workers), "-q"]):
            if cli.main(argv) != 0:
                raise SystemExit(f"kdsb {' '.join(argv)} failed")
    return root


def _pointed_at(component: np.ndarray | None, volume: volumes.Volume, lesion: dict) -> bool:
    if component is None or not component.any():
        return False
    points = np.argwhere(component) * np.asarray(volume.spacing) + np.asarray(volume.origin)
    distance = np.linalg.norm(points - np.asarray(lesion["center_mm"]), axis=1)
    return bool((distance <= lesion["radius_mm"] + HIT_REACH_MM).mean() >= HIT_FRACTION)


def _largest(volume: volumes.Volume) -> np.ndarray | None:
    """The former rule: the largest soft-tissue component after the vessel opening."""
    labels, count = qc_lesion._soft_tissue(volume.hu, volume.lung_mask > 0, volume.spacing)
    if count == 0:
        return None
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--base", type=Path, help="a real chest CT (default: the tests' one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 202])
    parser.add_argument("--patients", type=int, nargs="+", default=[16, 20],
                        help="patients per seed (one number for all, or one per seed)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    base = args.base
    if base is None:
        files = reference_files()
        if files is None:
            raise SystemExit("no --base given and the tests' real CT cannot be fetched")
        base = files / "aorta_report" / "example_ct.nii.gz"
    sizes = args.patients * len(args.seeds) if len(args.patients) == 1 else args.patients
    if len(sizes) != len(args.seeds):
        raise SystemExit("--patients takes one number, or one per seed")
    roots = [_cohort(args.workdir, base, seed, patients, args.workers)
             for seed, patients in zip(args.seeds, sizes, strict=True)]
    summary = []
    print(f"{'seed':>5} {'id':<12}{'cancer lesion':<32}{'former':>8}{'today':>7}"
          f"{'today ml':>10}{'elong.':>8}")
    for seed, patients, root in zip(args.seeds, sizes, roots, strict=True):
        counts = {"cancers": 0, "soft": 0, "former": 0, "today": 0}
        seconds = []
        for path in sorted((root / "volumes").glob("*.h5")):
            volume = volumes.read_volume(path)
            record = json.loads(truth_paths(root / "cohort", volume.patient_id)[1].read_text())
            cancers = [lesion for lesion in record["lesions"] if lesion["kind"] != "small_solid"]
            started = time.process_time()
            found = qc_lesion.find_lesion(volume.hu, volume.lung_mask, volume.spacing)
            seconds.append(time.process_time() - started)
            if not cancers:
                continue
            cancer = cancers[0]
            former = _pointed_at(_largest(volume), volume, cancer)
            today = _pointed_at(found.mask if found else None, volume, cancer)
            counts["cancers"] += 1
            if cancer["kind"] not in NO_SOFT_TISSUE_KINDS:
                counts["soft"] += 1
                counts["former"] += former
                counts["today"] += today
            name = f"{cancer['kind']} {cancer['place']} {cancer['radius_mm']:.0f} mm"
            print(f"{seed:>5} {volume.patient_id:<12}{name:<32}{'yes' if former else 'no':>8}"
                  f"{'yes' if today else 'no':>7}{found.volume_ml if found else 0:>10.1f}"
                  f"{found.elongation if found else 0:>8.1f}")
        summary.append((seed, patients, counts, statistics.median(seconds)))
    print(f"\n{'seed':>5}{'patients':>10}{'cancers':>9}{'with soft tissue':>18}"
          f"{'former rule':>13}{'today':>7}{'s / search':>12}")
    for seed, patients, counts, median_s in summary:
        print(f"{seed:>5}{patients:>10}{counts['cancers']:>9}{counts['soft']:>18}"
              f"{counts['former']:>13}{counts['today']:>7}{median_s:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
