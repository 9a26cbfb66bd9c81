"""What a model reads and how: one `VolumeInput` turns a volume file into a classifier's input.

A trained classifier carries its `VolumeInput` inside `classifier.keras` (a record layer,
`kdsb.models.input_record`) and in `classifier.json` beside it (`save`, `for_model`; the file
also serves checkpoints and older models); a trained GMCAE carries the spacing of its training
volumes in `gmcae.json` beside `gmcae.keras` (`save_gmcae_spacing`, `gmcae_spacing_of`), so
`kdsb embed` refuses volumes of another grid. `check_spacing` is the one rule both apply. Training,
validation scoring and `kdsb predict` read volumes only through `VolumeInput.read`, so a
model is always fed the way it was trained. Steps of `read`:

1. refuse a volume whose spacing differs from `spacing_mm` (the training volumes' spacing);
2. normalise HU: clip to `hu_clip`, then map linearly -1000 HU → -1 and 400 HU → +1
   (`kdsb.data.patches.normalize_hu`);
3. downscale every axis by `downscale` with block means (cropped first to a multiple of the
   factor, losing < factor voxels at the far end of each axis; the lung mask takes block maxima);
4. with `mask_outside_lungs`, set every voxel farther than `lung_dilation_mm` from the lung mask
   to `outside_hu` (normalised), the distance measured in mm with the voxel spacing after
   downscaling. Voxels of `lung_mask` are at distance 0: they reach the network unchanged.

Why lung parenchyma fills the outside (`PARENCHYMA_HU`): the label is a property of the lungs,
and the encoder's global maxima must land on nodules. With an air fill and a wide margin they sat
on the air and on the chest wall beside it, identical in every patient, and the classifier did
not learn (training log loss stuck at ln 2). Parenchyma makes the mask border no edge at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdsb.data.patches import normalize_hu
from kdsb.errors import KdsbError, StoreError, UsageError
from kdsb.hu import AIR_HU, INPUT_CLIP_MAX_HU, PARENCHYMA_HU
from kdsb.io import volumes
from kdsb.io.atomic import write_json
from kdsb.io.series import same_spacing

logger = logging.getLogger(__name__)

INPUT_NAME = "classifier.json"
GMCAE_INPUT_NAME = "gmcae.json"
# The subfolders of a run folder a model may lie in: kdsb.training.runs.CHECKPOINT_DIR and the
# fold folders (kdsb.io.run_layout.FOLD_PREFIX); tests check they agree.
RUN_SUBFOLDER = re.compile(r"^(checkpoints|fold_\d+)$")
DEFAULT_LUNG_DILATION_MM = 2.0
MODEL_SPACING = "the model's training volumes"  # where an expected spacing comes from
# Keys of a saved VolumeInput that every classifier.json of this package holds; the others
# (`spacing_mm`, `hu_clip`) came later and default to what those classifiers did.
REQUIRED_KEYS = ("mask_outside_lungs", "lung_dilation_mm", "downscale", "outside_hu")


@dataclass(frozen=True)
class VolumeInput:
    """How a volume file becomes a classifier input (see the module docstring for the steps).

    Attributes:
        spacing_mm: (z, y, x) voxel spacing in mm the model was trained on; None: any spacing.
        hu_clip: (low, high) HU clip bounds applied before normalisation.
        mask_outside_lungs: replace voxels far from the lung mask by `outside_hu`.
        lung_dilation_mm: margin in mm kept around the lung mask.
        outside_hu: HU given to the masked voxels.
        downscale: integer downscaling factor of every axis (block means).
    """

    spacing_mm: tuple[float, float, float] | None = None
    hu_clip: tuple[float, float] = (float(AIR_HU), float(INPUT_CLIP_MAX_HU))
    mask_outside_lungs: bool = True
    lung_dilation_mm: float = DEFAULT_LUNG_DILATION_MM
    outside_hu: float = float(PARENCHYMA_HU)
    downscale: int = 1

    def __post_init__(self) -> None:
        if self.spacing_mm is not None:
            object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "hu_clip", tuple(float(h) for h in self.hu_clip))
        checks = (
            (self.spacing_mm is None or (len(self.spacing_mm) == 3 and min(self.spacing_mm) > 0),
             "a spacing of 3 positive mm", self.spacing_mm),
            (len(self.hu_clip) == 2 and self.hu_clip[0] < self.hu_clip[1],
             "an HU clip (low, high) with low < high", self.hu_clip),
            (not isinstance(self.downscale, bool) and int(self.downscale) == self.downscale
             and self.downscale >= 1, "--downscale >= 1", self.downscale),
            (self.lung_dilation_mm >= 0, "--lung-dilation-mm >= 0", self.lung_dilation_mm),
            (math.isfinite(self.outside_hu), "a finite --outside-hu", self.outside_hu),
        )
        for ok, expected, received in checks:
            if not ok:
                raise UsageError(f"expected {expected}, received {received!r}")
        object.__setattr__(self, "downscale", int(self.downscale))

    def to_config(self) -> dict[str, Any]:
        """JSON-ready fields (lists for tuples)."""
        config = asdict(self)
        config["spacing_mm"] = None if self.spacing_mm is None else list(self.spacing_mm)
        config["hu_clip"] = list(self.hu_clip)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config") -> VolumeInput:
        """The inverse of `to_config`; other keys (notes such as `gmcae`) are ignored.

        Raises:
            KdsbError: a key of `REQUIRED_KEYS` is missing or a value is out of range.
        """
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise KdsbError(
                f"{source}: expected the keys {', '.join(REQUIRED_KEYS)}, missing "
                f"{', '.join(missing)}"
            )
        names = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except (UsageError, TypeError, ValueError) as error:  # ValueError: float("x")
            raise KdsbError(f"{source}: {error}") from None

    def save(self, run_dir: str | os.PathLike, **notes: Any) -> Path:
        """Write `classifier.json` (these fields plus `notes`, e.g. the GMCAE) into `run_dir`."""
        config = {**notes, **self.to_config()}
        return write_json(Path(run_dir) / INPUT_NAME, dict(sorted(config.items())))

    @classmethod
    def for_model(cls, model_path: str | os.PathLike, model: Any = None) -> VolumeInput:
        """The `VolumeInput` of a saved classifier.

        The record the loaded `model` carries (`kdsb.models.input_record`: every
        `classifier.keras` written by train-classifier), else `classifier.json` in the model's
        folder (its run folder) or in the two above (`checkpoints/epoch_NNNN.keras`,
        `fold_k/…`). A record without a training spacing (classifiers older than the spacing
        check) is warned of: volumes of any spacing pass.

        Raises:
            KdsbError: no record and no classifier.json (a model copied without it would be fed
                volumes of any spacing, normalised and masked by guess), or one that is not
                valid JSON or lacks a required key.
        """
        carried = None
        if model is not None:
            from kdsb.models.input_record import input_record_of

            carried = input_record_of(model)
        if carried is not None:
            found = (Path(model_path), carried)
        else:
            found = record_beside(model_path, INPUT_NAME, levels=3)
        if found is None:
            raise KdsbError(
                f"expected {INPUT_NAME} beside {model_path} (how the model reads a volume: "
                f"spacing, HU, masking; train-classifier writes it into the run folder), "
                f"received none: copy it with the model"
            )
        volume_input = cls.from_config(found[1], str(found[0]))
        if volume_input.spacing_mm is None:
            logger.warning("%s records no training spacing: volumes of any spacing are scored "
                           "(train it again to have them checked)", found[0])
        return volume_input

    def check(self, path: str | os.PathLike, spacing: Sequence[float], shape: Sequence[int],
              whose: str = MODEL_SPACING):
        """Refuse a volume of another spacing, or too small for `downscale`.

        Args:
            path: the volume file, for the message.
            spacing: its (z, y, x) spacing in mm.
            shape: its (z, y, x) shape in voxels.
            whose: where `spacing_mm` came from, for the message (`check_spacing`).

        Raises:
            StoreError: naming the file.
        """
        check_spacing(path, spacing, self.spacing_mm, whose)
        if min(shape) < self.downscale:
            raise StoreError(
                f"{path}: expected a volume of at least {self.downscale} voxels per axis for "
                f"--downscale {self.downscale}, received shape {tuple(shape)}"
            )

    def fit_to(self, paths: Sequence[str | os.PathLike]) -> VolumeInput:
        """Check every volume file (attributes only); record their common spacing.

        Called by training before any voxel is read, so a corrupt, foreign or too small file is
        a one-line error naming it, not a TensorFlow traceback.

        Returns:
            This input with `spacing_mm` set to the volumes' spacing.

        Raises:
            StoreError: a file is unreadable or not a kdsb volume file, too small for
                `downscale`, or of another spacing than most files (`common_spacing`).
        """
        read = [volumes.read_attrs(path) for path in paths]  # each file's header read once
        fitted = self
        if fitted.spacing_mm is None:
            fitted = replace(fitted, spacing_mm=_most_files_spacing(
                paths, [attrs["spacing"] for attrs in read]))
        for path, attrs in zip(paths, read, strict=True):
            fitted.check(path, attrs["spacing"], attrs["shape"], MODEL_SPACING)
        return fitted

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The network input of one volume file: float32 (z, y, x, 1), normalised HU.

        Raises:
            StoreError: the file is unreadable, of another spacing or too small (see `check`).
        """
        import edt

        with volumes.open_volume(path) as f:
            spacing = np.asarray(f.attrs["spacing"], dtype=np.float64)
            self.check(path, spacing, f[volumes.HU_DATASET].shape)
            x = normalize_hu(f[volumes.HU_DATASET][...], clip=self.hu_clip)
            lung = f[volumes.MASK_DATASET][...] if self.mask_outside_lungs else None
        if self.downscale > 1:
            x = block_reduce_cropped(x, self.downscale, np.mean).astype(np.float32)
            lung = None if lung is None else block_reduce_cropped(lung, self.downscale, np.max)
            spacing = spacing * self.downscale
        if lung is not None:
            if not lung.any():
                logger.warning("%s: empty lung mask, keeping the whole volume", path)
            else:
                # `edt`, not scipy's transform: the same distances here (checked on 21 M voxels
                # of random masks and spacings, ties included), 4× faster, and float32 without
                # scipy's feature-transform index arrays (54 bytes a voxel at its peak).
                distance = edt.edt(np.ascontiguousarray(lung == 0),
                                   anisotropy=tuple(float(s) for s in spacing),
                                   black_border=False, parallel=1)
                x[distance > self.lung_dilation_mm] = normalize_hu(
                    np.float32(self.outside_hu), clip=self.hu_clip
                )
        return x[..., np.newaxis]


def check_spacing(path: str | os.PathLike, spacing: Sequence[float],
                  expected_mm: Sequence[float] | None, whose: str = MODEL_SPACING) -> None:
    """Refuse a volume whose (z, y, x) spacing (mm) is not `expected_mm`: by default the model's
    training spacing; `whose` says where it came from, for the message.

    Raises:
        StoreError: naming the file, both spacings and the fix (None expected: any spacing).
    """
    if expected_mm is not None and not same_spacing(spacing, expected_mm):
        raise StoreError(
            f"{path}: expected a spacing of {_mm(expected_mm)} mm ({whose}), received "
            f"{_mm(spacing)} mm; preprocess it with that --spacing"
        )


def common_spacing(paths: Sequence[str | os.PathLike]) -> tuple[float, float, float]:
    """The (z, y, x) spacing in mm every volume file shares (attributes only).

    Raises:
        StoreError: a file is unreadable or not a kdsb volume file, or its spacing differs from
            most files' (the first file's where no spacing is held by most): the message names
            the odd file out, not one of the many (found by a user's trial).
    """
    return _most_files_spacing(paths, [volumes.read_attrs(path)["spacing"] for path in paths])


def _most_files_spacing(paths: Sequence[str | os.PathLike],
                        read: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """`common_spacing` of files whose spacings (z, y, x, mm) were `read`."""
    spacings = [tuple(float(s) for s in spacing) for spacing in read]
    if not spacings:
        raise StoreError("expected at least one volume file, received none")
    # Grouped to 1 µm (`same_spacing` tells equal ones apart no finer); ties: the first file's.
    counts = Counter(tuple(round(s, 3) for s in spacing) for spacing in spacings)
    key, count = counts.most_common(1)[0]
    if count * 2 > len(spacings):
        spacing = next(s for s in spacings if tuple(round(v, 3) for v in s) == key)
        whose = f"that of {count} of the {len(spacings)} volumes: a run takes one spacing"
    else:
        spacing = spacings[0]
        whose = f"that of {Path(paths[0]).name}, the first volume: a run takes one spacing"
    for path, own in zip(paths, spacings, strict=True):
        check_spacing(path, own, spacing, whose)
    return spacing


def save_gmcae_spacing(run_dir: str | os.PathLike, spacing: Sequence[float]) -> Path:
    """Write `gmcae.json` (the training volumes' spacing, mm) into a GMCAE's run folder."""
    return write_json(Path(run_dir) / GMCAE_INPUT_NAME,
                      {"spacing_mm": [float(s) for s in spacing]})


def gmcae_spacing_of(model_path: str | os.PathLike) -> tuple[float, float, float] | None:
    """The training spacing recorded beside a GMCAE (its folder, or the parent of
    `checkpoints/`); None, with a warning, for a model saved before it was recorded.

    Raises:
        KdsbError: gmcae.json is not valid JSON or has no valid `spacing_mm`.
    """
    found = record_beside(model_path, GMCAE_INPUT_NAME)
    if found is not None:
        path, record = found
        try:
            spacing = record["spacing_mm"]
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ValueError(spacing)
        except (KeyError, TypeError, ValueError) as error:
            raise KdsbError(f"{path}: expected JSON with spacing_mm, 3 positive mm, "
                            f"received invalid content ({error})") from None
        return tuple(float(s) for s in spacing)
    logger.warning("no %s beside %s: the volumes' spacing is not checked", GMCAE_INPUT_NAME,
                   model_path)
    return None


def record_beside(model_path: str | os.PathLike, name: str, levels: int = 2
                   ) -> tuple[Path, Any] | None:
    """(path, parsed JSON) of the record `name` saved beside a model: in its folder (the run
    folder), else in up to `levels` - 1 folders above, climbing only out of a run's own
    subfolders (2: `checkpoints/epoch_NNNN.keras`; 3 also a fold's,
    `RUN_DIR/fold_k/checkpoints/epoch_NNNN.keras`); None without one. Never from a folder
    that merely holds the model's folder: a stray record there is another model's.

    Raises:
        KdsbError: the record is not valid JSON.
    """
    folders = [Path(model_path).parent]
    while len(folders) < levels and RUN_SUBFOLDER.match(folders[-1].name):
        folders.append(folders[-1].parent)
    for candidate in (folder / name for folder in folders):
        if candidate.is_file():
            try:
                return candidate, json.loads(candidate.read_text())
            except json.JSONDecodeError as error:
                raise KdsbError(
                    f"{candidate}: expected JSON, received invalid text ({error})"
                ) from None
    return None


def _mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def block_reduce_cropped(array: np.ndarray, factor: int, func) -> np.ndarray:
    """`func` over factor³ blocks (HU: mean, lung mask: max), the array first cropped to a
    multiple of `factor` per axis: the downscaling of `VolumeInput.read`."""
    from skimage.measure import block_reduce

    # Crop to a multiple of the factor so no block mixes in padding.
    whole = tuple(slice(0, n - n % factor) for n in array.shape)
    return block_reduce(array[whole], (factor,) * array.ndim, func)
