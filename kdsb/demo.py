"""`kdsb demo WORKDIR`: the whole pipeline on phantom cohorts, on a CPU, in minutes.

Stages (each writes under WORKDIR; a killed demo run again skips the cohorts and models it
finished and resumes a training where it stopped, preprocess skips the volumes written, predict
takes the patients its journal holds, a cohort cut short is drawn again and evaluate runs
again):

1. `synth`: a training cohort and a separate held-out test cohort (another seed), small phantoms
   (`PHANTOM_SCALE` of an adult chest, `PHANTOM_SIZE`² pixels per slice; nodule radii stay
   physical, so the label rule "a nodule of radius ≥ 8 mm" is unchanged);
2. `preprocess` both at `SPACING_MM` mm: a 2 mm grid keeps 8 mm nodules 8 voxels across while
   cutting the voxels eightfold against 1 mm, which is what makes whole-volume training fit a
   CPU budget;
3. `train-gmcae` on the training volumes (small width, a few short epochs);
4. `train-classifier` on the training cohort with the lungs masked (the body wall, heart and
   spine hold large soft-tissue blobs that a nodule detector would otherwise confuse with
   cancer; masked voxels become lung parenchyma, see `kdsb.data.inputs`), a held-out
   validation split, early stopping on validation log loss; a small head (global max pooling,
   32 units, dropout 0.5) for the few dozen training phantoms;
5. `predict` the test cohort (mean over `TTA_COUNT` cube symmetries) and `evaluate` it
   against its labels (table and plots).

The summary compares the held-out log loss with the base rate (the best constant predictor on
the same patients, ln 2 for a balanced cohort) and shows the AUC.

`run_demo_seeds` repeats the whole demo for several seeds (cohorts and training both change;
`WORKDIR/seed_<s>/` each) and reports every seed's test scores with their mean ± standard
deviation (`seeds.csv`): how much the figures of one run are luck.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kdsb.errors import KdsbError, UsageError
from kdsb.phantoms.layout import dicom_dir, labels_path

logger = logging.getLogger(__name__)

PHANTOM_SIZE = 128
PHANTOM_SCALE = 0.8
SPACING_MM = 2.0
# The phantoms' lung masks hold their juxtapleural nodules: no margin needed around them.
LUNG_DILATION_MM = 0.0
TEST_SEED_OFFSET = 1000
# Test-time augmentation: the mean over the first cube symmetries tempers the confident
# mistakes of a classifier trained on a few dozen patients (cheap: volumes of ~10⁵ voxels).
TTA_COUNT = 8
SEEDS_NAME = "seeds.csv"
STAGE_SECONDS_NAME = "seconds.json"
PLAN_NAME = "plan.json"  # the plan and seed a demo folder was begun with
# Test scores of the seed table, in column order.
SEED_COLUMNS = ("log_loss", "base_rate_log_loss", "roc_auc", "brier", "ece", "accuracy",
                "seconds")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run.

    Attributes:
        patients: training cohort size (half are cancer cases).
        test_patients: held-out test cohort size.
        gmcae_epochs, gmcae_steps, gmcae_width: GMCAE training budget and base width.
        classifier_epochs, patience, lr: classifier training budget.
        restarts: trainings again of a classifier stuck at the base rate (`--restarts`).
    """

    patients: int
    test_patients: int
    gmcae_epochs: int
    gmcae_steps: int
    gmcae_width: int
    classifier_epochs: int
    patience: int
    lr: float
    restarts: int


FULL_PLAN = DemoPlan(
    patients=64, test_patients=32, gmcae_epochs=4, gmcae_steps=40, gmcae_width=8,
    classifier_epochs=40, patience=10, lr=1e-3, restarts=2,
)
# A smoke test of every stage: it checks the plumbing, not that the classifier learns.
FAST_PLAN = DemoPlan(
    patients=6, test_patients=4, gmcae_epochs=1, gmcae_steps=4, gmcae_width=2,
    classifier_epochs=1, patience=1, lr=1e-3, restarts=0,
)


class _StageClock:
    """Wall seconds of each stage of one demo folder, summed over every run of the folder, kept
    in `WORKDIR/seconds.json`: a stage stopped part-way counts what it ran (its work is kept and
    reused), a rerun of a finished stage the seconds it takes to find it done."""

    def __init__(self, work: Path) -> None:
        from kdsb.io.atomic import read_json

        self.path = work / STAGE_SECONDS_NAME
        self.seconds: dict[str, float] = read_json(self.path) if self.path.is_file() else {}

    @contextmanager
    def stage(self, key: str, name: str) -> Iterator[None]:
        from kdsb.io.atomic import write_json

        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
            write_json(self.path, self.seconds)
        print(f"   {elapsed:.0f} s", flush=True)

    def total(self) -> float:
        return sum(self.seconds.values())


def synth_cohort(root: Path, patients: int, seed: int) -> Path:
    from kdsb.phantoms.cohort import write_cohort

    labels = labels_path(root)
    if labels.is_file():
        return labels
    # labels.csv is written last (atomically): without it, anything under `root` is a killed
    # synth's partial cohort, which is rewritten from scratch.
    return write_cohort(
        root, patients=patients, seed=seed, size=PHANTOM_SIZE, scale=PHANTOM_SCALE, overwrite=True
    )


def preprocess_cohort(dicom_root: Path, out_dir: Path, workers: int) -> None:
    from kdsb.preprocessing.cohort import run_cohort
    from kdsb.preprocessing.out_dir import MANIFEST_NAME

    if run_cohort(dicom_root, out_dir, workers=workers, spacing=SPACING_MM) != 0:
        raise KdsbError(
            f"expected every phantom of {dicom_root} to preprocess, received failures "
            f"(see {out_dir / MANIFEST_NAME})"
        )


def train_demo_gmcae(volumes: Path, run_dir: Path, plan: DemoPlan, seed: int) -> Path:
    """Train the GMCAE into `run_dir`, or reuse a finished run; returns the model's path."""
    from kdsb.training.gmcae import MODEL_NAME, SUMMARY_NAME, GmcaeOptions, train_gmcae

    model = run_dir / MODEL_NAME
    if model.is_file() and (run_dir / SUMMARY_NAME).is_file():
        return model
    options = GmcaeOptions(
        epochs=plan.gmcae_epochs, steps_per_epoch=plan.gmcae_steps, validation_steps=4,
        batch_size=8, width=plan.gmcae_width, patch_size=16, mixtures=2, lr=1e-3, seed=seed,
    )
    train_gmcae(volumes, run_dir, options, resume=_started(run_dir))
    return model


def _train_classifier(
    volumes: Path, labels: Path, gmcae: Path, run_dir: Path, plan: DemoPlan, seed: int
) -> dict:
    """Train the classifier into `run_dir`, or reuse a finished run; returns its metrics.json."""
    from kdsb.io.atomic import read_json
    from kdsb.io.run_layout import METRICS_NAME
    from kdsb.training.classifier import train_classifier
    from kdsb.training.classifier_options import ClassifierOptions

    metrics_path = run_dir / METRICS_NAME
    if metrics_path.is_file():
        return read_json(metrics_path)  # a damaged one: a one-line error (found in review)
    options = ClassifierOptions(
        gmcae=str(gmcae), epochs=plan.classifier_epochs, lr=plan.lr, seed=seed,
        patience=plan.patience, lung_dilation_mm=LUNG_DILATION_MM, val_fraction=0.25,
        batch_size=4, levels=(1,), dense_units=32, dropout=0.5, class_weight="none",
        restarts=plan.restarts,
    )
    return train_classifier(volumes, labels, run_dir, options, resume=_started(run_dir))


def _started(run_dir: Path) -> bool:
    """Whether a killed demo began a run in `run_dir` (its options saved): resumed, it goes on
    from its checkpoints, attempts or finished folds (the folder's plan.json vouches that the
    options are the same)."""
    from kdsb.io.run_layout import OPTIONS_NAME

    return (run_dir / OPTIONS_NAME).is_file()


def _default_restarts() -> int:
    """`train-classifier --restarts`'s default."""
    import dataclasses

    from kdsb.training.classifier_options import ClassifierOptions

    return next(f.default for f in dataclasses.fields(ClassifierOptions) if f.name == "restarts")


def _settings() -> dict[str, float]:
    """The demo's fixed settings, recorded in its plan: a folder made by code of other settings
    would otherwise have its stages reused as if they were this code's."""
    return {"phantom_size": PHANTOM_SIZE, "phantom_scale": PHANTOM_SCALE,
            "spacing_mm": SPACING_MM, "lung_dilation_mm": LUNG_DILATION_MM,
            "tta_count": TTA_COUNT}


def _plan_of(fast: bool, patients: int | None) -> DemoPlan:
    """The demo's plan for `--fast` and `--patients` (the test cohort half of it, at least 2)."""
    plan = FAST_PLAN if fast else FULL_PLAN
    if patients is not None:
        plan = DemoPlan(**{**plan.__dict__, "patients": patients,
                           "test_patients": max(2, patients // 2)})
    return plan


def _pin_plan(work: Path, plan: DemoPlan, seed: int, write: bool = True) -> None:
    """Record the plan, seed and settings a demo folder is made with (`PLAN_NAME`), or refuse
    others: finished stages are reused, so a folder begun with --fast (or another seed or size,
    or by code of other settings) would mix those results into this run. Without `write`, only
    the refusal.

    Raises:
        UsageError: `work` was begun with another plan or seed.
    """
    from kdsb.io.atomic import read_json, write_json

    settings = _settings()
    wanted = {**plan.__dict__, "seed": seed, **settings}
    path = work / PLAN_NAME
    if path.is_file():
        begun = read_json(path)
        # Folders begun before the plan held it trained with the option's default; before it
        # held the settings, with those of their code (not known: taken as today's).
        begun.setdefault("restarts", _default_restarts())
        for key, value in settings.items():
            begun.setdefault(key, value)
        if begun != wanted:
            changed = ", ".join(f"{k} {begun.get(k)} → {v}" for k, v in wanted.items()
                                if begun.get(k) != v)
            raise UsageError(f"expected the plan {work} was begun with, received another "
                             f"({changed}): use a new folder")
        return
    if not write:
        return
    if work.is_dir() and any(work.iterdir()):
        logger.warning("%s has no %s: its finished stages are reused as they are", work,
                       PLAN_NAME)
    work.mkdir(parents=True, exist_ok=True)
    write_json(path, wanted)


def run_demo(
    workdir: str | os.PathLike, *, patients: int | None = None, seed: int = 0, fast: bool = False,
    workers: int = 2,
) -> dict[str, float]:
    """Run the demo into `workdir`; print a summary and return the held-out test scores.

    Args:
        workdir: the demo folder (created; reused stage by stage when it exists).
        patients: training cohort size (default 64, or 6 with `fast`); given, the test cohort is
            half of it (at least 2), else 32 (4 with `fast`).
        seed: seed of the training cohort (the test cohort uses seed + 1000) and of training.
        fast: a smoke run with tiny budgets (checks the plumbing, not the learning).
        workers: preprocessing processes.

    Returns:
        `kdsb.evaluation.metrics.summary` of the test predictions, plus the same summary of the
        validation patients under "validation" and under "seconds" the wall time of its
        stages, summed over every run of this folder (`_StageClock`, `seconds.json`).
    """
    from kdsb.evaluation.evaluate import CALIBRATION_PNG, ROC_PNG, evaluate, format_table
    from kdsb.evaluation.predict import predict_cohort
    from kdsb.io.paths import require_output_dir
    from kdsb.io.run_layout import BEST_NAME

    plan = _plan_of(fast, patients)
    _check_arguments(seed, patients, workers)  # before the plan is pinned
    work = require_output_dir(workdir, "WORKDIR, a folder for the demo")
    _pin_plan(work, plan, seed)
    clock = _StageClock(work)
    started = time.perf_counter()

    with clock.stage("synth", f"synth: {plan.patients} training and {plan.test_patients} test "
                     "phantoms"):
        train_labels = synth_cohort(work / "train_cohort", plan.patients, seed)
        test_labels = synth_cohort(work / "test_cohort", plan.test_patients,
                                   seed + TEST_SEED_OFFSET)

    with clock.stage("preprocess", f"preprocess at {SPACING_MM:g} mm"):
        train_volumes, test_volumes = work / "volumes" / "train", work / "volumes" / "test"
        preprocess_cohort(dicom_dir(work / "train_cohort"), train_volumes, workers)
        preprocess_cohort(dicom_dir(work / "test_cohort"), test_volumes, workers)

    with clock.stage("train-gmcae",
                     f"train-gmcae (width {plan.gmcae_width}, {plan.gmcae_epochs} epochs)"):
        gmcae = train_demo_gmcae(train_volumes, work / "runs" / "gmcae", plan, seed)

    with clock.stage("train-classifier",
                     f"train-classifier (up to {plan.classifier_epochs} epochs)"):
        clf_dir = work / "runs" / "classifier"
        validation = _train_classifier(train_volumes, train_labels, gmcae, clf_dir, plan, seed)

    with clock.stage("predict", "predict the held-out test cohort"):
        predictions = work / "test_predictions.csv"
        predict_cohort(test_volumes, [clf_dir / BEST_NAME], tta=True, tta_count=TTA_COUNT,
                       out_csv=predictions)
        plots = work / "plots"
        scores = evaluate(predictions, test_labels, plots_dir=plots)

    seconds, this_run = clock.total(), time.perf_counter() - started
    print()
    print(format_table(validation["validation"],
                       title="validation (held out from the training cohort)"))
    print(format_table(scores, title="test (a separate phantom cohort)"))
    beaten = "beats" if scores["log_loss"] < scores["base_rate_log_loss"] else "does NOT beat"
    print(f"the classifier {beaten} the base rate on the test cohort"
          + (f" (--fast: a smoke test of the plumbing on {int(scores['n'])} patients, not a "
             f"result)" if fast else ""))
    print(f"predictions: {predictions}")
    print(f"plots: {plots / ROC_PNG}, {plots / CALIBRATION_PNG}")
    print(f"wall time: {this_run / 60:.1f} min"
          + (f" (every run of this folder: {seconds / 60:.1f} min)" if seconds > this_run + 1
             else ""))
    return {**scores, "validation": validation["validation"], "seconds": seconds}


def _check_arguments(seed: int, patients: int | None, workers: int) -> None:
    """Refuse a seed training would refuse (found in review: -1 locked the folder's plan; 2³¹
    failed after both cohorts were made), fewer than 4 patients or workers below 1."""
    from kdsb.training.runs.options import MAX_SEED

    if patients is not None and patients < 4:
        raise UsageError(f"expected --patients >= 4, received {patients}")
    if not 0 <= seed < MAX_SEED:
        raise UsageError(f"expected --seed in [0, {MAX_SEED}), received {seed}")
    if int(workers) != workers or workers < 1:
        raise UsageError(f"expected --workers of at least 1, received {workers}")


def run_demo_seeds(
    workdir: str | os.PathLike, seeds: list[int], *, patients: int | None = None,
    fast: bool = False, workers: int = 2,
) -> list[dict[str, float]]:
    """`run_demo` once per seed into `workdir/seed_<s>` (each resumable), then a table of the
    test scores per seed with mean ± sd, printed and written to `workdir/seeds.csv`.

    Returns:
        The test scores of each seed (`run_demo`'s return), in `seeds` order.
    """
    import numpy as np

    from kdsb.io.tables import write_table

    if len(set(seeds)) != len(seeds) or not seeds:
        raise UsageError(f"expected distinct seeds, received {seeds}")
    work = Path(workdir)
    for seed in seeds:  # all before the first (found in review: `--seeds 0 -1` failed after 0;
        _check_arguments(seed, patients, workers)  # a later seed's folder of another plan)
        _pin_plan(work / f"seed_{seed}", _plan_of(fast, patients), seed, write=False)
    results = []
    for seed in seeds:
        print(f"\n######## seed {seed}", flush=True)
        results.append(run_demo(work / f"seed_{seed}", patients=patients, seed=seed, fast=fast,
                                workers=workers))
    table = np.array([[r[c] for c in SEED_COLUMNS] for r in results], dtype=np.float64)
    mean = table.mean(axis=0)
    sd = table.std(axis=0, ddof=1) if len(seeds) > 1 else np.full_like(mean, np.nan)
    rows = [[str(seed), *(f"{v:.4f}" for v in row)] for seed, row in
            zip(seeds, table, strict=True)]
    rows += [["mean", *(f"{v:.4f}" for v in mean)], ["sd", *(f"{v:.4f}" for v in sd)]]
    write_table(work / SEEDS_NAME, ["seed", *SEED_COLUMNS], rows)
    beaten = sum(r["log_loss"] < r["base_rate_log_loss"] for r in results)
    print(f"\ntest scores over {len(seeds)} seeds (mean ± sd):")
    for column, m, d in zip(SEED_COLUMNS, mean, sd, strict=True):
        print(f"  {column:<18}  {m:.3f} ± {d:.3f}")
    print(f"the classifier beats the base rate for {beaten} of {len(seeds)} seeds")
    print(f"per seed: {work / SEEDS_NAME}")
    return results
