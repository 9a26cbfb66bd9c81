"""Per-patient p(cancer) from trained classifiers: streaming, ensembling, TTA, submission CSV.

Patients are read one at a time (never the whole cohort), each volume prepared exactly as during
training, scored by every model, averaged and written as a Kaggle `id,cancer` CSV.

- Input preparation travels with the model: each model is fed through its own
  `kdsb.data.inputs.VolumeInput` (the record inside the model, else `classifier.json` beside
  it), so it sees volumes the way it
  was trained; models with different inputs can be ensembled (each volume is then prepared once
  per distinct `VolumeInput`).
- Ensembling (`ensemble_probability`): the members are every model and, with test-time
  augmentation (TTA), every cube symmetry of the input (`kdsb.data.patches`: the identity first,
  then the other 47 in `CUBE_SYMMETRIES` order, or only the first K; on an anisotropic grid only
  those that keep its spacing, `symmetries_for`); the ensemble's logit is the
  mean of the members' logits. Averaging probabilities instead pulls toward 0.5 whenever the
  members differ in scale: the fold models of a cross-validated run are each calibrated by one
  map fitted on all out-of-fold predictions, and a fold whose model came out timid (logits near
  0) then dragged every confident answer of the others halfway back. On the phantom benchmark
  (benchmarks/README.md) the logit mean lowered the held-out log loss of every cross-validated
  head (e.g. 0.334 → 0.240 for `spp`, 0.529 → 0.458 for attention `mil`, 96 patients) at the
  same AUC.
- Probabilities are clipped to [0.005, 0.995] by default. Log loss punishes a confident mistake
  without bound (-log 1e-15 ≈ 34.5 nats for one patient); at 0.005 a mistake costs at most
  5.3 nats while a correct confident answer still costs only 0.005 nats.

TensorFlow and Keras are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.data.inputs import VolumeInput
from kdsb.data.patches import CUBE_SYMMETRIES, apply_symmetry, symmetries_for
from kdsb.errors import (
    KdsbError,
    ModelError,
    StoreError,
    UsageError,
    naming_on_out_of_memory,
    one_line,
)
from kdsb.io.journal import SUFFIX, loaded_with_digests, optional_journal, volume_stamp
from kdsb.io.tables import summarise_ids, write_predictions
from kdsb.io.volumes import read_attrs, resolve_ids

logger = logging.getLogger(__name__)

PROBABILITY_CLIP = 0.005
TTA_ALL = len(CUBE_SYMMETRIES)


def tta_symmetries(tta: bool, count: int | None = None,
                   spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """The symmetry indices averaged per model: (0,) without TTA, else the first `count` of
    those that keep a grid of `spacing` (z, y, x) mm (`symmetries_for`: all 48 on an isotropic
    grid or with None; all there are where they are fewer than `count`)."""
    if not tta:
        return (0,)
    count = TTA_ALL if count is None else count
    if not 1 <= count <= TTA_ALL:
        raise UsageError(f"expected --tta-count in [1, {TTA_ALL}], received {count}")
    return symmetries_for(spacing)[:count]


def ensemble_probability(probabilities: Sequence[float]) -> float:
    """The ensemble's probability: sigmoid of the mean logit of its members' probabilities
    (each clipped to [2⁻²³, 1 − 2⁻²³] first, `kdsb.models.calibration.logit`)."""
    from kdsb.models.calibration import logit, sigmoid

    return float(sigmoid(np.mean(logit(probabilities))))


def member_probabilities(models: Sequence[Any], x: np.ndarray,
                         symmetries: Sequence[int] = (0,)) -> list[float]:
    """p(cancer) of each model under each cube symmetry of one prepared volume.

    Args:
        models: Keras classifiers, input (batch, z, y, x, 1), output (batch, 1) probabilities.
        x: the prepared volume, (z, y, x, 1) float32.
        symmetries: indices into `CUBE_SYMMETRIES`.

    Returns:
        len(symmetries) · len(models) probabilities, symmetry-major.
    """
    from kdsb.models.classifier import predict_probability

    members = []
    for index in symmetries:
        turned = apply_symmetry(x, index)
        members += [predict_probability(model, turned) for model in models]
    return members


def check_volumes(loaded: Iterable[tuple[VolumeInput, Any]], paths: Sequence[Path],
                  unreadable: dict[Path, str] | None = None) -> None:
    """Every volume fits every model's input (spacing, size; an nll head's GMCAE patch), read
    from the files' attributes: one volume of another spacing fails the command before any
    patient is scored, not after most of a cohort.

    Args:
        loaded: each model with the `VolumeInput` it reads through.
        paths: the volume files.
        unreadable: where given, a file whose attributes cannot be read (a damaged file) is
            put there (path → one-line reason) for its patient to fail alone, not raised.

    Raises:
        StoreError: naming the first file that does not fit (`VolumeInput.check`,
            `kdsb.models.nll.check_holds_a_patch`), or cannot be read (without `unreadable`).
    """
    from kdsb.models.nll import check_holds_a_patch, smallest_input

    needs = [(volume_input, smallest_input(model)) for volume_input, model in loaded]
    for path in paths:
        try:
            attrs = read_attrs(path)
        except StoreError as error:
            if unreadable is None:
                raise
            unreadable[path] = one_line(error)
            continue
        for volume_input, patch in needs:
            volume_input.check(path, attrs["spacing"], attrs["shape"])
            if patch > 1:
                check_holds_a_patch(path, [n // volume_input.downscale for n in attrs["shape"]],
                                    patch)


def load_classifiers(model_paths: Sequence[str | os.PathLike]) -> list[tuple[VolumeInput, Any]]:
    """Each saved classifier (run folders expanded) with the `VolumeInput` it reads through.

    Raises:
        UsageError: no model, or a model path that is neither a file nor a run folder.
        ModelError: a model file does not load or is no kdsb classifier.
        KdsbError: a classifier with neither its input record nor classifier.json
            (`VolumeInput.for_model`).
    """
    from kdsb.models.classifier import load_classifier

    loaded = []
    for path in resolve_model_paths(model_paths):
        model = load_classifier(path)  # first: is it a classifier at all?
        loaded.append((VolumeInput.for_model(path, model), model))
    return loaded


def resolve_model_paths(model_paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The model files named: a `.keras` file, or a run folder of `kdsb train-classifier` (its
    fold models when cross-validated, else its classifier.keras). Checked before any work.

    Raises:
        UsageError: no model, a missing path, a folder holding no trained classifier, a
            cross-validated run missing a fold model, or one model named twice (a file and the
            RUN_DIR holding it: the ensemble's mean would weigh it double).
    """
    from kdsb.io.paths import require_keras_file
    from kdsb.io.run_layout import model_paths_of_run

    if not model_paths:
        raise UsageError("expected at least one MODEL.keras or RUN_DIR, received none")
    resolved: list[Path] = []
    for path in map(Path, model_paths):
        if path.is_file():
            resolved.append(require_keras_file(path, "MODEL.keras or the RUN_DIR of kdsb "
                                                     "train-classifier"))
        elif path.is_dir() and model_paths_of_run(path):
            resolved.extend(model_paths_of_run(path, complete=True))
        else:
            state = "a folder without a trained classifier" if path.is_dir() else "a missing path"
            raise UsageError(
                f"expected MODEL.keras or the RUN_DIR of kdsb train-classifier, received "
                f"{state}: {path}"
            )
    seen: dict[Path, Path] = {}
    for path in resolved:
        if path.resolve() in seen:
            raise UsageError(f"expected each model once, received {path} twice (named twice, "
                             "or inside a RUN_DIR also named): it would count double")
        seen[path.resolve()] = path
    return resolved


class _EnsembleScorer:
    """The models grouped by how they read a volume (their `VolumeInput`), and the cube
    symmetries each volume's grid keeps for `--tta`."""

    def __init__(self, loaded: Sequence[tuple[VolumeInput, Any]], model_paths: Sequence[Path],
                 tta: bool, tta_count: int | None):
        self.groups: dict[VolumeInput, list[Any]] = {}
        for volume_input, model in loaded:
            self.groups.setdefault(volume_input, []).append(model)
        self.model_paths, self.tta, self.tta_count = model_paths, tta, tta_count
        self.symmetries = tta_symmetries(tta, tta_count)
        self._turns_of_grid: dict[tuple[float, ...], tuple[int, ...]] = {}

    def turns(self, path: Path) -> list[tuple[int, ...]]:
        """Each group's symmetries for the volume file `path`: without TTA (0,); with it
        those that keep the grid the group reads the volume on (its model's spacing, else the
        file's own)."""
        if not self.tta:
            return [self.symmetries] * len(self.groups)
        return [self._grid_symmetries(volume_input.spacing_mm or read_attrs(path)["spacing"])
                for volume_input in self.groups]

    def symmetry_count(self) -> int:
        """The symmetries averaged per model: the most any group's grid keeps (all of them for
        a group that reads each file on its own grid)."""
        if not self.tta:
            return 1
        return max(len(self._grid_symmetries(volume_input.spacing_mm))
                   if volume_input.spacing_mm else len(self.symmetries)
                   for volume_input in self.groups)

    def _grid_symmetries(self, spacing: Sequence[float]) -> tuple[int, ...]:
        """TTA's symmetries on a grid of `spacing` (z, y, x) mm, warned of once if fewer."""
        key = tuple(float(s) for s in spacing)
        if key not in self._turns_of_grid:
            self._turns_of_grid[key] = tta_symmetries(self.tta, self.tta_count, key)
            if len(self._turns_of_grid[key]) < len(self.symmetries):
                logger.warning("--tta: only %d cube symmetries keep a grid of %s mm (the others "
                               "would squash the anatomy); its volumes are averaged over those",
                               len(self._turns_of_grid[key]), " × ".join(f"{s:g}" for s in key))
        return self._turns_of_grid[key]

    def probability(self, path: Path, turns: Sequence[tuple[int, ...]]) -> float:
        """The ensemble's probability for the volume file `path` (`ensemble_probability` over
        every model and symmetry), unclipped.

        Raises:
            StoreError: the file cannot be read. MemoryError: out of memory, naming the file.
            ModelError: a model gave NaN (a damaged or diverged model).
        """
        members: list[float] = []
        with naming_on_out_of_memory(str(path)):
            for (volume_input, models), group_turns in zip(self.groups.items(), turns,
                                                           strict=True):
                members += member_probabilities(models, volume_input.read(path), group_turns)
        probability = ensemble_probability(members)
        if not math.isfinite(probability):
            raise ModelError(
                f"{path}: expected finite probabilities from the model(s), received "
                f"{sum(map(math.isnan, members))} NaN of {len(members)} "
                f"({', '.join(map(str, self.model_paths))})"
            )
        return probability


def predict_cohort(
    data_dir: str | os.PathLike,
    model_paths: Sequence[str | os.PathLike],
    *,
    ids: Sequence[str] | None = None,
    ids_source: str = "ids",
    tta: bool = False,
    tta_count: int | None = None,
    clip: float = PROBABILITY_CLIP,
    out_csv: str | os.PathLike | None = None,
    fill_missing: float | None = None,
) -> dict[str, float]:
    """p(cancer) for each patient, streaming one volume at a time.

    Args:
        data_dir: folder of `<id>.h5` volumes.
        model_paths: saved classifiers (`.keras`) or run folders (every fold model); their
            probabilities are ensembled (`ensemble_probability`).
        ids: patients to score, in output order; None scores every volume, sorted by id.
        ids_source: where `ids` came from, for messages.
        tta: ensemble over cube symmetries of the input too.
        tta_count: with `tta`, use the first this many symmetries (of 48 on an isotropic grid;
            None: all).
        clip: probabilities are clipped to [clip, 1 - clip].
        out_csv: write the `id,cancer` CSV here (atomically). The run is then journalled in
            `OUT_CSV.partial` (`kdsb.io.journal`): a killed run, run again with the same
            models, options and volumes, scores only the patients it had not finished. The
            journal is removed once the CSV is written; an earlier CSV there is removed as
            scoring begins (after the checks): a run that fails leaves none.
        fill_missing: the probability (clipped as the others) given to patients whose volume
            file cannot be read (damaged) and to ids of `ids` without a volume (a scan that
            failed preprocessing, in a submission that must name every patient), each named in
            a warning; None: such patients are an error.

    Returns:
        Patient id → probability, in output order.

    Raises:
        LabelsError: an id has no volume (checked before any model is loaded), unless
            `fill_missing`.
        UsageError: no model, a missing model file, a bad clip or TTA count.
        ModelError: a model file does not load or is no kdsb classifier; a model gives a
            patient NaN (a damaged or diverged model: nothing is written for it).
        StoreError: a volume does not fit a model's `VolumeInput` (spacing, size; checked
            before any patient is scored), or cannot be read (unless `fill_missing`).
    """
    model_paths = resolve_model_paths(model_paths)
    if not 0.0 <= clip < 0.5:
        raise UsageError(f"expected --clip in [0, 0.5), received {clip}")
    symmetries = tta_symmetries(tta, tta_count)
    if len(symmetries) > 1:
        warn_unaugmented(model_paths)
    if fill_missing is not None and not 0.0 <= fill_missing <= 1.0:
        raise UsageError(f"expected --fill-missing in [0, 1], received {fill_missing}")
    # The fill value as written: clipped as the scored probabilities are.
    filled = None if fill_missing is None else float(np.clip(fill_missing, clip, 1.0 - clip))
    data_dir = Path(data_dir)
    order, volumes = resolve_ids(data_dir, ids, ids_source,
                                 allow_missing=fill_missing is not None,
                                 advice=" (--fill-missing P gives them probability P)")
    missing = [i for i in order if i not in volumes]
    if missing:
        logger.warning("%d of %d id(s) of %s have no volume in %s: given %s without a model (%s)",
                       len(missing), len(order), ids_source, data_dir,
                       filled, summarise_ids(missing))
    loaded, models = load_fingerprinted(model_paths)
    scorer = _EnsembleScorer(loaded, model_paths, tta, tta_count)
    unreadable: dict[Path, str] | None = {} if fill_missing is not None else None
    check_volumes(loaded, [volumes[i] for i in order if i in volumes], unreadable)
    if unreadable:  # found by a user's trial: one damaged file stopped a whole submission
        damaged = [i for i in order if volumes.get(i) in unreadable]
        logger.warning("%d volume file(s) cannot be read: given %s without a model (%s)",
                       len(damaged), filled,
                       "; ".join(unreadable.values()))
        for patient_id in damaged:
            del volumes[patient_id]
        missing += damaged
    logger.info(
        "scoring %d patient(s) with %d model(s), %d symmetry(ies) each",
        len(order) - len(missing), len(model_paths), scorer.symmetry_count(),
    )
    fingerprint = {"command": "predict", "symmetries": len(symmetries), "models": models}
    journal_path = None if out_csv is None else Path(f"{out_csv}{SUFFIX}")
    predictions: dict[str, float] = {}
    with optional_journal(journal_path, fingerprint, "predict") as journal:
        if out_csv is not None:  # found in review: a failed rerun left an earlier run's CSV,
            Path(out_csv).unlink(missing_ok=True)  # which evaluate then scored (explain: peaks)
        for patient_id in tqdm(order, desc="predict", unit="patient", disable=None):
            path = volumes.get(patient_id)
            if path is None:
                predictions[patient_id] = filled
                continue
            try:
                # Each group's symmetries are in the stamp too: a journal begun under another
                # rule for which turns keep a grid is not mixed in.
                turns = scorer.turns(path)
                stamp = [*volume_stamp(path), [list(t) for t in turns]]
                probability = journal.result(patient_id, stamp) if journal else None
                fresh = probability is None
                if fresh:
                    probability = scorer.probability(path, turns)
            # Voxels damaged under a readable header, or a file removed or replaced since the
            # check (found in review: the latter stopped a run given --fill-missing).
            except (StoreError, OSError) as error:
                if fill_missing is None:
                    raise
                reason = error if isinstance(error, StoreError) else (
                    f"{path}: expected a volume file, received {error.strerror or error}")
                logger.warning("%s: given %s without a model", reason, filled)
                predictions[patient_id] = filled
                del volumes[patient_id]  # filled, not scored (the spread check below)
                continue
            if fresh and journal:
                journal.record(patient_id, stamp, probability)
            predictions[patient_id] = float(np.clip(probability, clip, 1.0 - clip))
        if out_csv is not None:
            write_predictions(out_csv, predictions)
            journal.finish()
    warn_if_indistinct([predictions[i] for i in order if i in volumes], clip)
    return predictions


def warn_if_indistinct(written: Sequence[float], clip: float) -> None:
    """Warn when every scored patient (three or more) was written the same probability, within
    `metrics.CONSTANT_SPREAD` (found by a user's trial: a phantom-trained run gave every
    real-anatomy patient 0.995, and predict said nothing); `clip` names a clip bound they sit
    at."""
    from kdsb.evaluation.metrics import CONSTANT_SPREAD, prediction_spread

    if len(written) < 3 or prediction_spread(written) >= CONSTANT_SPREAD:
        return
    mean = float(np.mean(written))
    bound = " (a --clip bound)" if min(mean - clip, 1.0 - clip - mean) < CONSTANT_SPREAD else ""
    logger.warning("every one of the %d patients scored got p(cancer) within %.0e of %.3g%s: "
                   "the predictions tell none of them apart (scans unlike those the model(s) "
                   "trained on, or a calibration map that flattens them: a slope near 0 in its "
                   "run's metrics.json?)", len(written), CONSTANT_SPREAD, mean, bound)


def warn_unaugmented(model_paths: Sequence[Path]) -> None:
    """Warn of each model whose run's options (`config.json`) say it trained without cube
    symmetries (`--no-augment`): test-time augmentation shows it orientations it never saw."""
    from kdsb.data.inputs import record_beside
    from kdsb.io.run_layout import OPTIONS_NAME

    for path in model_paths:
        try:
            found = record_beside(path, OPTIONS_NAME, levels=3)
        except KdsbError:  # a damaged config.json: nothing known, and predict needs none
            continue
        if found is not None and isinstance(found[1], dict) and found[1].get("augment") is False:
            logger.warning("--tta: %s was trained without augmentation (--no-augment, %s): "
                           "the cube symmetries show it orientations it never saw", path,
                           found[0])


def load_fingerprinted(model_paths: Sequence[Path]) -> tuple[list[tuple[VolumeInput, Any]], list]:
    """`load_classifiers`, and what identifies the ensemble in a journal (`kdsb.io.journal`):
    each model file's content (SHA-256) and the input it reads through.

    Raises:
        as `load_classifiers`; UsageError: a model file changed while it was loaded (a training
        run still writing it), so its digest might not be the loaded model's.
    """
    loaded, digests = loaded_with_digests(model_paths, lambda: load_classifiers(model_paths))
    return loaded, [[digest, dataclasses.asdict(volume_input)]
                    for digest, (volume_input, _) in zip(digests, loaded, strict=True)]

