"""Occlusion sensitivity of a kdsb classifier: a cube of `occlusion_mm` is set to the masking
fill (healthy parenchyma, the input's "nothing here") at every step of `stride_mm` over the lung
mask's bounding box; the map is the drop p(original) - p(occluded), spread over the cube. One
forward pass per position: minutes per patient on a CPU at 1 mm."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_OCCLUSION_MM = 24.0
STRIDES_PER_EDGE = 1.5  # default step: the cube edge / 1.5 (16 mm for 24 mm cubes)


def occlusion(
    model: Any, x: np.ndarray, lung: np.ndarray, fill: float, size: Sequence[int],
    stride: Sequence[int], voxel_mm: Sequence[float] | None = None, models: int = 1,
) -> tuple[np.ndarray, float]:
    """Occlusion sensitivity of one prepared input.

    Args:
        model: a kdsb classifier.
        x: the prepared input, float32 (z, y, x, 1).
        lung: bool (z, y, x) lung mask on the input grid: cubes are placed over its bounding box
            and only where they touch it.
        fill: the normalised value an occluded voxel gets.
        size: edges of the occluding box in input voxels (z, y, x): a cube in mm.
        stride: steps in input voxels (z, y, x).
        voxel_mm: the input voxels' size (z, y, x), mm, for the log line: the cube in mm as
            rounded to whole voxels (a 5 mm request on 2 mm voxels is a 4 mm cube).
        models: the ensemble's models the patient is occluded for, each in turn: the log's
            estimate of the patient's time counts them all (0: no estimate, a later model's
            call; found by a user's trial: a two-fold run took twice the time it said).

    Returns:
        (map on the input grid (z, y, x): the mean drop in p over the cubes covering each voxel,
        clipped at 0; the model's p(cancer) for the unoccluded input).
    """
    p0 = float(model(x[np.newaxis], training=False)[0, 0])
    total = np.zeros(x.shape[:3], np.float32)
    count = np.zeros(x.shape[:3], np.float32)
    found = np.argwhere(lung)
    if not len(found):
        return total, p0
    low, high = found.min(axis=0), found.max(axis=0) + 1
    # The last start of each axis lies within `size` of the box's far end, so the cubes
    # cover the whole box.
    starts = [range(int(a), max(int(a) + 1, int(b) - edge + step), step)
              for a, b, edge, step in zip(low, high, size, stride, strict=True)]
    sz, sy, sx = size
    cubes = [np.s_[z:z + sz, y:y + sy, x0:x0 + sx]
             for z in starts[0] for y in starts[1] for x0 in starts[2]]
    cubes = [cube for cube in cubes if lung[cube].any()]
    in_mm = ""
    if voxel_mm is not None:
        cube_mm, step_mm = ("×".join(f"{n * v:g}" for n, v in zip(edges, voxel_mm, strict=True))
                            for edges in (size, stride))
        in_mm = f" ({cube_mm} mm, every {step_mm} mm)"
    logger.info("occlusion: %d cubes of %s input voxels%s, one forward pass each", len(cubes),
                "×".join(map(str, size)), in_mm)
    if all(edge >= b - a for edge, a, b in zip(size, low, high, strict=True)):
        # One cube over all the lungs shows nothing of where (found by a user's trial).
        logger.warning("occlusion: the cube covers the lungs' whole box (%s input voxels): the "
                       "map can only be flat; a smaller --occlusion-mm shows where",
                       "×".join(str(int(b - a)) for a, b in zip(low, high, strict=True)))
    # One forward pass a cube: minutes a patient on a CPU, so its own progress bar, and an
    # estimate from the first cube for logs off a terminal (found in review: none there).
    for index, cube in enumerate(tqdm(cubes, desc="occlusion", unit="cube", leave=False,
                                      disable=None)):
        started = time.perf_counter()
        occluded = x.copy()
        occluded[cube] = fill
        p = float(model(occluded[np.newaxis], training=False)[0, 0])
        total[cube] += p0 - p
        count[cube] += 1
        if index == 0 and len(cubes) > 1 and models > 0:
            seconds = time.perf_counter() - started
            logger.info("occlusion: %.2f s a cube, about %s for this patient (%d model(s))",
                        seconds, _duration(seconds * len(cubes) * models), models)
    drop = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return np.maximum(drop, 0.0), p0


def _duration(seconds: float) -> str:
    """"12 s" under a minute, else "3.5 min" (found by a user's trial: "about 0.0 min")."""
    if seconds < 0.5:
        return "under 1 s"
    return f"{seconds:.0f} s" if seconds < 59.5 else f"{seconds / 60.0:.1f} min"


def checked_occlusion_stride_mm(occlusion_mm: float, stride_mm: float | None) -> float:
    """The occlusion step in mm (None: `occlusion_mm` / `STRIDES_PER_EDGE`), the sizes checked.

    Raises:
        UsageError: a size not finite and positive, or a step wider than the cubes (they would
            leave lung between them that no occlusion covers: a map of 0 there).
    """
    given = {"--occlusion-mm": occlusion_mm} if stride_mm is None else {
        "--occlusion-mm": occlusion_mm, "--stride-mm": stride_mm}
    bad = [f"{flag} {mm:g}" for flag, mm in given.items() if not (math.isfinite(mm) and mm > 0)]
    if bad:  # only what was given (found by a user's trial: a derived step was quoted)
        raise UsageError(f"expected positive, finite occlusion sizes in mm, received "
                         f"{' and '.join(bad)}")
    if stride_mm is None:
        stride_mm = occlusion_mm / STRIDES_PER_EDGE
    if stride_mm > occlusion_mm:
        raise UsageError(f"expected --stride-mm at most --occlusion-mm (cubes that overlap or "
                         f"touch), received {stride_mm} > {occlusion_mm}")
    return stride_mm
