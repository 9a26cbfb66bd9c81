#!/usr/bin/env python
"""Do the MIL head's instances carry the lesions? A probe with the lesions' truth per cell.

The MIL head (`train-classifier --head mil`) sees each volume as a bag of frozen GMCAE encoder
cells (block 2 by default: one cell per 4³ voxels of the 2 mm volume, cached under
`RUN_DIR/bags/`). On an implanted real-anatomy cohort (`benchmarks/classifier.py --base ...`)
the truth says where every lesion is, so the cells can be labelled: lesion cells (centre within
an implanted lesion of radius >= 8 mm) against lung cells far from every lesion (no centre within
its radius + 8 mm; small nodules included). Two probes (scikit-learn's logistic regression and
gradient-boosted trees, balanced classes) are fitted on the cells of the first `--train`
patients and scored on the others' ("held-out" below: held out from the probes, not from
the GMCAE, which `classifier.py` trained on every training volume, these included):

- cell AUC: lesion cells against far lung cells of the held-out patients;
- patient AUC: each held-out patient scored by the mean of its three highest lung cells, the
  most a max-pooling head could make of these features with cell-level supervision.

A high cell AUC with a low patient AUC means the features see lesions but also score some of
the ~10⁴ healthy cells of every patient as high: the head needs a specificity the features do
not give. Every figure is of one split of patients; `--train` moves it.

Usage: python benchmarks/instance_probe.py WORKDIR/seed_S RUN_NAME [--train 64]
(e.g. `/tmp/imp96/seed_0 mil_96` after `benchmarks/classifier.py /tmp/imp96 --base CT
--sizes 96 --seeds 0 --heads mil --test-size 32`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CELL_VOXELS = 4  # a block-2 cell is 4³ voxels of the volume
CANCER_MIN_RADIUS_MM = 8.0  # lesions at least this large are the label's lesions
FAR_MARGIN_MM = 8.0  # far lung: no cell centre within a lesion's radius + this
FAR_CELLS_PER_PATIENT = 3000  # far lung cells drawn per patient for the probes
TOP_CELLS = 3


def patient_cells(seed_dir: Path, run_dir: Path, truth_file: Path, centres) -> dict:
    """One training patient's cells: features, whether each holds lung, is lesion, is far.
    `centres(extent)` gives (stride, offset): cell i centred on voxel stride · i + offset."""
    from kdsb.io import volumes

    truth = json.loads(truth_file.read_text())
    pid = truth["id"]
    bag_files = sorted((run_dir / "bags").glob(f"{pid}-*.npy"))
    if not bag_files:
        raise SystemExit(f"{run_dir / 'bags'} holds no bag of {pid}: run the mil head first")
    features = np.load(bag_files[0])[0].astype(np.float32)  # the first symmetry
    volume = volumes.read_volume(volumes.volume_path(seed_dir / "volumes" / "train", pid))
    lungs = volume.lung_mask.astype(bool)
    origin, spacing = np.asarray(volume.origin), np.asarray(volume.spacing)
    cells = [-(-n // CELL_VOXELS) for n in lungs.shape]  # the encoder pads to whole cells
    if int(np.prod(cells)) != features.shape[0]:
        raise SystemExit(f"{pid}: {features.shape[0]} instances, expected {cells} cells")
    padding = [(0, c * CELL_VOXELS - n) for c, n in zip(cells, lungs.shape, strict=True)]
    padded = np.pad(lungs, padding)
    blocks = padded.reshape(cells[0], CELL_VOXELS, cells[1], CELL_VOXELS, cells[2], CELL_VOXELS)
    index = np.indices(cells).reshape(3, -1).T
    # Where each cell is centred on the volume (the encoder's "same" padding: not the middle of
    # its 4³ block), as explain maps cells.
    stride_offset = np.array([centres(n) for n in lungs.shape])
    centre_mm = origin + (index * stride_offset[:, 0] + stride_offset[:, 1]) * spacing
    lesion = np.zeros(len(index), dtype=bool)
    near = np.zeros(len(index), dtype=bool)
    for found in truth["lesions"]:
        distance = np.linalg.norm(centre_mm - np.asarray(found["center_mm"]), axis=1)
        if found["radius_mm"] >= CANCER_MIN_RADIUS_MM:
            lesion |= distance <= found["radius_mm"]
        near |= distance <= found["radius_mm"] + FAR_MARGIN_MM
    return {"id": pid, "label": int(truth["label"]), "features": features,
            "lung": blocks.any(axis=(1, 3, 5)).ravel(), "lesion": lesion, "far": ~near}


def labelled_cells(patients: list[dict], rng: np.random.Generator):
    """(features, 0/1) of the patients' lesion cells and a draw of their far lung cells."""
    x, y = [], []
    for patient in patients:
        far = np.flatnonzero(patient["lung"] & patient["far"])
        far = rng.choice(far, min(len(far), FAR_CELLS_PER_PATIENT), replace=False)
        lesion = np.flatnonzero(patient["lesion"])
        x += [patient["features"][far], patient["features"][lesion]]
        y += [np.zeros(len(far)), np.ones(len(lesion))]
    return np.concatenate(x), np.concatenate(y)


def main(argv=None) -> int:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kdsb.evaluation.gradcam import cell_centres
    from kdsb.phantoms.layout import truth_dir
    from kdsb.training.bags import instance_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path, help="a seed's folder of benchmarks/classifier.py")
    parser.add_argument("run", help="the mil run's folder name under runs/ (e.g. mil_96)")
    parser.add_argument("--train", type=int, default=64, help="patients the probes fit on")
    args = parser.parse_args(argv)
    truths = sorted(truth_dir(args.seed_dir / "train_cohort").glob("*.json"))
    run_dir = args.seed_dir / "runs" / args.run
    config = json.loads((run_dir / "config.json").read_text())
    if config["mil_block"] != 2:
        raise SystemExit(f"{run_dir}: expected a mil run on block 2 (cells of {CELL_VOXELS}³ "
                         f"voxels), received block {config['mil_block']}")
    encoder = instance_features(config["gmcae"], "mil", config["mil_block"])
    patients = [patient_cells(args.seed_dir, run_dir, t, lambda n: cell_centres(encoder, n))
                for t in truths]
    if not 0 < args.train < len(patients):
        raise SystemExit(f"expected --train between 1 and {len(patients) - 1}")
    fit, held_out = patients[: args.train], patients[args.train :]
    rng = np.random.default_rng(0)
    x_fit, y_fit = labelled_cells(fit, rng)
    x_test, y_test = labelled_cells(held_out, rng)
    labels = [p["label"] for p in held_out]
    print(f"{args.seed_dir} {args.run}: probes fit on {len(fit)} patients ({int(y_fit.sum())} "
          f"lesion cells, {int((1 - y_fit).sum())} far lung cells), scored on {len(held_out)} "
          f"({sum(labels)} with cancer)")
    print(f"{'probe':<16}{'cell AUC':>10}{'patient AUC':>13}")
    probes = {
        "logistic": LogisticRegression(max_iter=2000, class_weight="balanced"),
        "boosted trees": HistGradientBoostingClassifier(max_iter=200, class_weight="balanced",
                                                        random_state=0),
    }
    for name, probe in probes.items():
        model = make_pipeline(StandardScaler(), probe).fit(x_fit, y_fit)
        cell_auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
        top = [np.sort(model.predict_proba(p["features"][p["lung"]])[:, 1])[-TOP_CELLS:].mean()
               for p in held_out]
        print(f"{name:<16}{cell_auc:>10.3f}{roc_auc_score(labels, top):>13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
