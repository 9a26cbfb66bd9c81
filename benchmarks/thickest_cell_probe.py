#!/usr/bin/env python
"""Does the GMCAE add anything to lesion size on real anatomy? A probe at the thickest tissue.

On implanted real-anatomy cohorts the hand-made reference of `benchmarks/classifier.py` (the
thickest tissue inside the lung mask, one number a patient) ranks held-out patients far better
than any head. This probe hands the GMCAE the same place: each volume is read as the MIL head
reads it (the demo's lung masking, no margin: `kdsb.data.inputs.VolumeInput`), the depth of
tissue above `TISSUE_HU` is measured on that input (Euclidean distance, mm, to the nearest voxel
that is not), and the frozen encoder's block-2 cell centred nearest the deepest voxel gives 16
features. Three scikit-learn logistic regressions (standardised features, default L2 penalty)
are fitted on the first n training patients and score the held-out cohort:

- size: the depth alone (the reference's feature, measured on the network input);
- features: the encoder's 16 features of the thickest cell alone;
- size + features: both.

If the GMCAE saw what tells a lesion from the hilum or a vessel at the same depth, "size +
features" would beat "size"; the features alone show how much of the size they carry.

Usage: python benchmarks/thickest_cell_probe.py WORKDIR/seed_S GMCAE [--sizes 24 48 96]
WORKDIR/seed_S is a seed's folder of `benchmarks/classifier.py` (volumes/train, volumes/test,
labels_N.csv with N the largest size, test_cohort/labels.csv), GMCAE a trained `gmcae.keras`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TISSUE_HU = -600  # the reference's tissue (benchmarks/classifier.py)
ENCODER_BLOCK = 2  # the MIL head's default cells
PROBES = ("size", "features", "size + features")


def thickest_cell(volume_input, encoder, path: Path) -> tuple[float, np.ndarray]:
    """(depth in mm of the deepest tissue voxel of the network input, the encoder's features of
    the cell centred nearest it)."""
    from scipy import ndimage

    from kdsb.data.patches import normalize_hu
    from kdsb.evaluation.gradcam import cell_centres

    x = volume_input.read(path)
    tissue = x[..., 0] > normalize_hu(np.float32(TISSUE_HU), clip=volume_input.hu_clip)
    depth = ndimage.distance_transform_edt(tissue, sampling=volume_input.spacing_mm)
    deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
    cells = np.asarray(encoder(x[np.newaxis], training=False))[0]
    index = []
    for axis, voxel in enumerate(deepest):
        stride, offset = cell_centres(encoder, x.shape[axis])
        index.append(int(np.clip(round((voxel - offset) / stride), 0, cells.shape[axis] - 1)))
    return float(depth.max()), cells[tuple(index)].astype(np.float64)


def probe_table(train: list[tuple[float, np.ndarray, int]], test: list[tuple[float, np.ndarray,
                int]], sizes: list[int]) -> list[tuple[int, str, float, float]]:
    """(n, probe, held-out AUC, held-out log loss) of each probe fitted on the first n."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def design(rows, probe):
        parts = {"size": lambda r: [r[0]], "features": lambda r: list(r[1]),
                 "size + features": lambda r: [r[0], *r[1]]}[probe]
        return np.array([parts(r) for r in rows])

    y_test = np.array([r[2] for r in test])
    table = []
    for n in sizes:
        fit = train[:n]
        for probe in PROBES:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
            model.fit(design(fit, probe), [r[2] for r in fit])
            p = model.predict_proba(design(test, probe))[:, 1]
            table.append((n, probe, roc_auc_score(y_test, p), log_loss(y_test, p)))
    return table


def main(argv=None) -> int:
    from tqdm import tqdm

    from kdsb import demo
    from kdsb.io import volumes
    from kdsb.io.tables import read_labels
    from kdsb.phantoms.layout import labels_path
    from kdsb.training.bags import instance_features
    from kdsb.training.classifier_options import ClassifierOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path, help="a seed's folder of benchmarks/classifier.py")
    parser.add_argument("gmcae", type=Path, help="a trained gmcae.keras")
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 48, 96])
    args = parser.parse_args(argv)
    labels_csv = args.seed_dir / f"labels_{max(args.sizes)}.csv"
    if not labels_csv.is_file():
        raise SystemExit(f"expected {labels_csv} (benchmarks/classifier.py --sizes "
                         f"{max(args.sizes)}), received none")
    train_labels = read_labels(labels_csv)
    test_labels = read_labels(labels_path(args.seed_dir / "test_cohort"))
    folders = {"train": args.seed_dir / "volumes" / "train",
               "test": args.seed_dir / "volumes" / "test"}
    # The mil head's input in benchmarks/classifier.py: the demo's lung masking, no margin, so
    # the depth is that script's `thickest_tissue_mm` measured on the network input.
    options = ClassifierOptions(gmcae=str(args.gmcae), head="mil",
                                lung_dilation_mm=demo.LUNG_DILATION_MM)
    volume_input = options.volume_input().fit_to(
        [volumes.volume_path(folders["train"], i) for i in train_labels])
    encoder = instance_features(args.gmcae, "mil", ENCODER_BLOCK)
    rows = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        rows[split] = [(*thickest_cell(volume_input, encoder,
                                       volumes.volume_path(folders[split], i)), y)
                       for i, y in tqdm(sorted(labels.items()), desc=split, disable=None)]
    print(f"{args.seed_dir}, GMCAE {args.gmcae}: held-out cohort of {len(rows['test'])} "
          f"({sum(r[2] for r in rows['test'])} with cancer)")
    print(f"{'n':>4}  {'probe':<16}{'held-out AUC':>14}{'log loss':>10}")
    for n, probe, auc, loss in probe_table(rows["train"], rows["test"], sorted(args.sizes)):
        print(f"{n:>4}  {probe:<16}{auc:>14.3f}{loss:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
