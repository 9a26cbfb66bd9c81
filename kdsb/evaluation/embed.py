"""What the GMCAE learned about each patient: embeddings, unusual patients, similar patients, a map.

Per patient, `patches` lung patches (P³ at the volume's spacing, P the GMCAE's patch edge,
centred on lung voxels, no augmentation, seeded by `--seed` and the volume's lung mask, so two
copies of one scan under two ids are each other's nearest neighbours at distance 0) go through
the GMCAE:

- **embedding**: the encoder's bottleneck (P/8, P/8, P/8, C) averaged over space per patch, then the
  mean and the maximum over the patient's patches (2C features: what is typical, what stands
  out);
- **likelihood**: each patch's mixture NLL per voxel (the training loss); the patient's mean,
  90th percentile and the mean of its `top` most unusual patches.

From the cohort's table:

- **outlier score**: the mean of two standardised scores, the distance to the `neighbours`
  nearest patients in the standardised embedding space (how far from everyone else) and the
  NLL of the most unusual patches (how badly the model explains some of its lung); rank 1 is
  the most unusual patient;
- **neighbours**: the `neighbours` most similar patients of each (Euclidean, standardised
  embeddings), for case retrieval;
- **map**: the first two principal components, coloured by label when labels are given, the
  most unusual patients named.

Files (DESIGN.md, `kdsb embed`): `embeddings.csv` (`id`, `emb_mean_000` …, `emb_max_000` …,
`nll_mean`, `nll_p90`, `nll_top`), `outliers.csv` (`id,score,rank`), `neighbours.csv`
(`id,neighbour,distance`), `map.png`. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, naming_on_out_of_memory, one_line
from kdsb.io.atomic import atomic_path, remove_stale_temporaries
from kdsb.io.journal import Journal, volume_stamp
from kdsb.io.tables import write_table

logger = logging.getLogger(__name__)

EMBEDDINGS_NAME = "embeddings.csv"
OUTLIERS_NAME = "outliers.csv"
NEIGHBOURS_NAME = "neighbours.csv"
MAP_NAME = "map.png"
DEFAULT_PATCHES = 64
DEFAULT_NEIGHBOURS = 5
DEFAULT_TOP = 4
NAMED_OUTLIERS = 5  # the most unusual patients named on the map
MIN_PATIENTS = 3
NLL_COLUMNS = ("nll_mean", "nll_p90", "nll_top")


@dataclass(frozen=True)
class CohortEmbedding:
    """The cohort's table: one row per patient.

    Attributes:
        ids: patient ids, in row order.
        embeddings: float64 (patients, 2C) pooled encoder features.
        nll: float64 (patients, 3) mean, 90th percentile and top-patch mean NLL per voxel.
    """

    ids: list[str]
    embeddings: np.ndarray
    nll: np.ndarray


def patient_features(
    gmcae: Any, both: Any, path: str | os.PathLike, patches: int, top: int, seed: int,
    spacing_mm: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(embedding (2C,), NLL statistics (3,)) of one volume file (see the module docstring),
    `both` being `kdsb.models.gmcae.codes_and_mixtures(gmcae)`.

    Raises:
        StoreError: the file is unreadable, or its spacing is not `spacing_mm` (the GMCAE's
            training spacing; None: any).
    """
    from keras import ops

    from kdsb.data.datasets import read_patches
    from kdsb.data.inputs import check_spacing
    from kdsb.io.volumes import read_attrs
    from kdsb.models.gmcae import mixtures_of
    from kdsb.models.losses import gaussian_mixture_nll, split_mixture_params

    check_spacing(path, read_attrs(path)["spacing"], spacing_mm)
    rng = np.random.default_rng(seed)
    x = read_patches(path, patch_size=int(gmcae.input_shape[1]), count=patches, sampling="lung",
                     augment=False, rng=rng)[..., np.newaxis]
    codes, packed = both.predict(x, verbose=0)
    pooled = np.asarray(codes, dtype=np.float64).mean(axis=(1, 2, 3))  # (patches, C)
    params = split_mixture_params(packed, mixtures_of(gmcae))
    nll = ops.convert_to_numpy(gaussian_mixture_nll(x.reshape(len(x), -1), *params))
    nll = np.sort(nll.astype(np.float64))[::-1]
    embedding = np.concatenate([pooled.mean(axis=0), pooled.max(axis=0)])
    stats = np.array([nll.mean(), np.percentile(nll, 90), nll[: max(1, top)].mean()])
    return embedding, stats


def patient_seed(seed: int, path: str | os.PathLike) -> int:
    """The seed of one patient's patch sampling: from `seed` and the volume file's lung mask
    (its shape and bytes: the mask alone, small and read anyway to place the patches, tells a
    scan from every other), so a patient's features do not change with the other files in
    DATA_DIR, and an exact duplicate (one scan preprocessed under two ids) gets the same
    patches (found in review: seeded by the id, duplicates were no nearer than other patients).

    Raises:
        StoreError: the file is unreadable.
    """
    from kdsb.io.volumes import MASK_DATASET, open_volume

    with open_volume(path) as f:
        mask = np.ascontiguousarray(f[MASK_DATASET][...])
    digest = hashlib.sha256(f"{seed}:{mask.shape}:{mask.dtype}".encode())
    digest.update(mask.view(np.uint8).data)
    return int.from_bytes(digest.digest()[:4], "little")


def embed_cohort(
    gmcae: Any,
    paths: Mapping[str, str | os.PathLike],
    *,
    patches: int = DEFAULT_PATCHES,
    top: int = DEFAULT_TOP,
    seed: int = 0,
    spacing_mm: tuple[float, float, float] | None = None,
    journal: Journal | None = None,
) -> tuple[CohortEmbedding, dict[str, str]]:
    """Features of every patient; a patient whose file cannot be read, or whose spacing is not
    `spacing_mm` (the GMCAE's training spacing; None: any), fails alone. With a `journal`
    (`kdsb.io.journal`, opened for this GMCAE and these options), each patient's features are
    journalled, and those a killed run journalled are taken from it.

    Returns:
        (the table of the patients that worked, {id: one-line reason} for those that failed).
    """
    from kdsb.models.gmcae import codes_and_mixtures

    both = codes_and_mixtures(gmcae)
    ids, embeddings, nll, failed = [], [], [], {}
    for patient_id, path in tqdm(paths.items(), desc="embed", unit="patient", disable=None):
        try:
            # A result holds for this file and --seed (the patient's own seed follows from
            # both: `patient_seed`, read only when the journal has no result).
            stamp = [*volume_stamp(path), seed]
        except OSError as error:  # a dangling link, a file removed since: this patient alone
            failed[patient_id] = (f"{path}: expected a volume file, received "
                                  f"{error.strerror or error}")
            continue
        done = journal.result(patient_id, stamp) if journal else None
        if done is not None:
            embedding, stats = np.array(done["embedding"]), np.array(done["nll"])
        else:
            try:
                with naming_on_out_of_memory(str(path)):
                    embedding, stats = patient_features(gmcae, both, path, patches, top,
                                                        patient_seed(seed, path), spacing_mm)
                if not (np.isfinite(embedding).all() and np.isfinite(stats).all()):
                    raise KdsbError(f"{path}: expected finite GMCAE features, received NaN or "
                                    "infinite values (a damaged volume or GMCAE?)")
            except KdsbError as error:
                failed[patient_id] = one_line(error)
                continue
            if journal:
                journal.record(patient_id, stamp, {"embedding": embedding.tolist(),
                                                   "nll": stats.tolist()})
        ids.append(patient_id)
        embeddings.append(embedding)
        nll.append(stats)
    if len(ids) < MIN_PATIENTS:
        first = next(iter(failed.values()), "")  # the others fail alike, as a rule
        more = f" (and {len(failed) - 1} more failed)" if len(failed) > 1 else ""
        raise KdsbError(f"expected at least {MIN_PATIENTS} readable patients to compare, "
                        f"received {len(ids)}" + (f"; {first}{more}" if first else ""))
    return CohortEmbedding(ids, np.array(embeddings), np.array(nll)), failed


def _standardise(values: np.ndarray) -> np.ndarray:
    scale = values.std(axis=0)
    return (values - values.mean(axis=0)) / np.where(scale > 0, scale, 1.0)


def outlier_scores(table: CohortEmbedding, neighbours: int) -> np.ndarray:
    """One score per patient, higher = more unusual (see the module docstring)."""
    from sklearn.neighbors import NearestNeighbors

    features = _standardise(table.embeddings)
    k = min(neighbours, len(table.ids) - 1)
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    isolation = distances[:, 1:].mean(axis=1)  # column 0 is the patient itself
    unusual_patches = table.nll[:, NLL_COLUMNS.index("nll_top")]
    return (_standardise(isolation[:, None]) + _standardise(unusual_patches[:, None]))[:, 0] / 2


def nearest_patients(table: CohortEmbedding, neighbours: int) -> list[tuple[str, str, float]]:
    """(id, neighbour, distance) rows: each patient's `neighbours` most similar patients."""
    from sklearn.neighbors import NearestNeighbors

    features = _standardise(table.embeddings)
    k = min(neighbours, len(table.ids) - 1)
    distances, indices = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    rows = []
    for row, patient_id in enumerate(table.ids):
        others = [(j, d) for j, d in zip(indices[row], distances[row], strict=True) if j != row]
        rows += [(patient_id, table.ids[j], float(d)) for j, d in others[:k]]
    return rows


def write_map(path: Path, table: CohortEmbedding, scores: np.ndarray,
              labels: Mapping[str, int] | None) -> Path:
    """The first two principal components of the standardised embeddings, one dot a patient."""
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    from kdsb.io.atomic import save_figure

    points = PCA(n_components=2).fit_transform(_standardise(table.embeddings))
    figure = Figure(figsize=(7, 6), dpi=100)
    ax = figure.subplots()
    groups = {"no label": [i for i, p in enumerate(table.ids) if not labels or p not in labels]}
    if labels:
        groups["cancer 0"] = [i for i, p in enumerate(table.ids) if labels.get(p) == 0]
        groups["cancer 1"] = [i for i, p in enumerate(table.ids) if labels.get(p) == 1]
    colours = {"no label": "grey", "cancer 0": "tab:blue", "cancer 1": "tab:red"}
    for name, rows in groups.items():
        if rows:
            ax.scatter(points[rows, 0], points[rows, 1], s=18, c=colours[name], label=name)
    for row in np.argsort(-scores)[:NAMED_OUTLIERS]:
        ax.annotate(table.ids[row], points[row], fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"{len(table.ids)} patients, GMCAE embeddings (most unusual named)")
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def write_embedding_files(
    out_dir: str | os.PathLike,
    table: CohortEmbedding,
    *,
    neighbours: int = DEFAULT_NEIGHBOURS,
    labels: Mapping[str, int] | None = None,
) -> list[Path]:
    """Write embeddings.csv, outliers.csv, neighbours.csv and map.png as a set: each to its
    temporary, then all renamed into place one after another (found in review: a run killed
    between two writes left new embeddings beside an earlier run's outliers and map); an earlier
    run's killed temporaries of these files are swept first. Returns their paths."""
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in (EMBEDDINGS_NAME, OUTLIERS_NAME, NEIGHBOURS_NAME,
                                           MAP_NAME)]
    if out_dir.is_dir():
        remove_stale_temporaries(out_dir, {path.name for path in targets})
    if neighbours > len(table.ids) - 1:
        logger.warning("%d patients: %d neighbours each, not the %d asked for", len(table.ids),
                       len(table.ids) - 1, neighbours)
    channels = table.embeddings.shape[1] // 2  # `patient_features`: the means, then the maxima
    header = ["id", *(f"emb_{statistic}_{i:03d}" for statistic in ("mean", "max")
                      for i in range(channels)), *NLL_COLUMNS]
    rows = [[pid, *(f"{v:.6g}" for v in emb), *(f"{v:.6g}" for v in nll)]
            for pid, emb, nll in zip(table.ids, table.embeddings, table.nll, strict=True)]
    scores = outlier_scores(table, neighbours)
    order = np.argsort(-scores, kind="stable")
    outliers = [[table.ids[row], f"{scores[row]:.6g}", rank]
                for rank, row in enumerate(order, start=1)]
    near = [[a, b, f"{d:.6g}"] for a, b, d in nearest_patients(table, neighbours)]
    with contextlib.ExitStack() as renames:  # on leaving: every rename, or every temp removed
        embeddings, outliers_csv, neighbours_csv, map_png = (
            renames.enter_context(atomic_path(path)) for path in targets)
        write_table(embeddings, header, rows)
        write_table(outliers_csv, ("id", "score", "rank"), outliers)
        write_table(neighbours_csv, ("id", "neighbour", "distance"), near)
        write_map(map_png, table, scores, labels)
    return targets
