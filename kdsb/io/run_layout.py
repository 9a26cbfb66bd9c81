"""The files of a run folder, and which of them are its models.

Every run (`kdsb train-gmcae`, `kdsb train-classifier`) keeps its options in config.json
(`OPTIONS_NAME`, the resume rule's record: `kdsb.training.runs.options`). A classifier run, one
split: classifier.keras (calibrated, carrying its input record), uncalibrated.keras,
classifier.json, metrics.json, config.json, split.json, volumes.json, history.csv,
finished.json, checkpoints/, logs/ (and bags/ for the heads mil and nll; restarts.json and
collapsed_N_* after restarts, `kdsb.training.attempts`). With folds:

```
RUN_DIR/
  config.json  classifier.json  metrics.json  oof.csv  calibration.png  (bags/)
  classifier.keras  the K fold models as one (their mean logit; `kdsb.models.ensemble`)
  history.csv       the folds' histories, with a `fold` column
  fold_1/ … fold_K/     one split each: classifier.keras, uncalibrated.keras, fold.json, …
```

Light (no TensorFlow), and below both training and evaluation: `predict`, `explain` and the
demo find a run's models here without importing the training package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdsb.errors import UsageError

OPTIONS_NAME = "config.json"
GMCAE_MODEL_NAME = "gmcae.keras"  # a GMCAE run's best model
BEST_NAME = "classifier.keras"
UNCALIBRATED_NAME = "uncalibrated.keras"
METRICS_NAME = "metrics.json"
OOF_NAME = "oof.csv"
OOF_LABEL = "label"  # oof.csv's column of each patient's label
OOF_FIELDS = ("id", "cancer", "fold", OOF_LABEL, "uncalibrated")
FOLD_NAME = "fold.json"
FOLD_PREFIX = "fold_"
BAGS_DIR = "bags"
CALIBRATION_PNG = "calibration.png"


def remove_results(run_dir: str | os.PathLike) -> None:
    """Remove a classifier run's results, which a run writes anew at its end: its calibrated
    model(s), metrics.json, oof.csv and calibration.png. A run begun or resumed to train more
    epochs then leaves no model of fewer epochs or of a former run (found in review: `predict`
    used them while the new one trained)."""
    run_dir = Path(run_dir)
    for name in (METRICS_NAME, OOF_NAME, CALIBRATION_PNG, BEST_NAME):
        (run_dir / name).unlink(missing_ok=True)
    for path in _fold_models(run_dir):
        path.unlink()


def _fold_models(run_dir: Path) -> list[Path]:
    """fold_1/classifier.keras, fold_2/…, in fold order (a user's fold_old/ is none of them)."""
    return sorted(
        (path for path in run_dir.glob(f"{FOLD_PREFIX}*/{BEST_NAME}")
         if path.parent.name.removeprefix(FOLD_PREFIX).isdigit()),
        key=lambda p: int(p.parent.name.removeprefix(FOLD_PREFIX)),
    )


def model_paths_of_run(run_dir: str | os.PathLike, complete: bool = False) -> list[Path]:
    """The classifiers of a run folder: its fold models (cross-validated) or its one model.

    Args:
        run_dir: the run folder.
        complete: refuse a cross-validated run with fewer calibrated fold models than its
            `--folds` (config.json): one stopped while its folds were calibrated, whose
            ensemble would silently be of a few folds only.

    Raises:
        UsageError: with `complete`, a fold model missing.
    """
    run_dir = Path(run_dir)
    fold_models = _fold_models(run_dir)
    if fold_models and complete:
        try:
            folds = int(json.loads((run_dir / OPTIONS_NAME).read_text())["folds"])
        except (OSError, ValueError, KeyError, TypeError):
            folds = len(fold_models)  # no readable record of the run: the models found
        if len(fold_models) < folds:
            raise UsageError(
                f"expected the {folds} fold models of {run_dir}, received {len(fold_models)}: "
                f"the run stopped before its folds were all calibrated (resume it with "
                f"kdsb train-classifier --resume)"
            )
    if fold_models:
        return fold_models
    single = run_dir / BEST_NAME
    return [single] if single.is_file() else []
