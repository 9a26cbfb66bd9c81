"""Training the Gaussian mixture convolutional autoencoder on 3D lung patches (`kdsb train-gmcae`).

Patients of DATA_DIR (kdsb HDF5 volumes) are split into training and validation sets by patient.
Training streams augmented patches (`kdsb.data.datasets.patch_dataset`); validation uses one fixed
set of un-augmented patches, so the validation NLL of every epoch, and the single-Gaussian
baseline, are measured on the same voxels. The run goes through the spine of
`kdsb.training.runs` (config.json, checkpoints/, history.csv, logs/, resume); the model data and
metric are this module's. A resumed run offsets the seed of the training stream by the epochs
done, so it draws patches it has not seen yet rather than replaying epoch 1's.

`--decoder` picks the decoder (`kdsb.models.gmcae.DECODERS`): "upsample" by default, "transpose"
as published. It changes the model, so a resumed run keeps it; a config.json saved before the
option existed resumes with "transpose", the decoder its checkpoints have.

RUN_DIR also receives:

- `gmcae.keras`: the best model by validation NLL;
- `loss.png`: training and validation NLL per voxel by epoch, with the baseline;
- `reconstructions.png`: central slices of validation patches beside their reconstructions;
- `gmcae_summary.json`: best and final validation NLL per voxel and the baseline;
- `gmcae.json`: the training volumes' spacing (`kdsb.data.inputs.save_gmcae_spacing`);
- `split.json`: its training and validation patients (`kdsb.training.runs.split`).

NumPy and TensorFlow are imported inside the functions, so the command line stays light.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kdsb.errors import UsageError
from kdsb.io.atomic import read_json, write_json
from kdsb.io.run_layout import GMCAE_MODEL_NAME
from kdsb.training import runs
from kdsb.training.runs import RunOptions, option

logger = logging.getLogger(__name__)

MODEL_NAME = GMCAE_MODEL_NAME
SUMMARY_NAME = "gmcae_summary.json"
LOSS_PLOT_NAME = "loss.png"
RECONSTRUCTIONS_PLOT_NAME = "reconstructions.png"
RECONSTRUCTION_ROWS = 4
MIN_VOLUMES = 2  # one for training, one for validation
# Validation patches come from their own seeded stream, apart from the training stream.
VALIDATION_SEED_OFFSET = 1_000_003
VALIDATION_CYCLE = 2  # volumes interleaved for the validation patches, on any machine
SAMPLINGS = ("lung", "grid")
PATCH_CACHE_DIR = ".patch_cache"  # hidden: volume listings skip it
# kdsb.models.gmcae.DECODERS and DEFAULT_DECODER and kdsb.models.layers.DEFAULT_VARIANCE_FLOOR,
# kept here (not imported: those modules load Keras) so that `kdsb --help` stays instant;
# tests check they agree.
DECODERS = ("transpose", "upsample")
DEFAULT_DECODER = "upsample"
DEFAULT_VARIANCE_FLOOR = 1e-3
# The decoder of runs saved before the option existed (their config.json has no "decoder").
LEGACY_DECODER = "transpose"


@dataclass(frozen=True, kw_only=True)
class GmcaeOptions(RunOptions):
    """Options of a GMCAE run (the command-line options of `kdsb train-gmcae`).

    Attributes (beyond `RunOptions`):
        steps_per_epoch: training batches per epoch.
        validation_steps: validation batches (one fixed set of patches).
        mixtures: mixture components m.
        width: base filters of the encoder.
        patch_size: patch edge in voxels (multiple of 8).
        patches_per_volume: patches read per visit of a volume.
        patch_cache: lung patches per training volume cached once (0: stream).
        sampling: "lung" (centred on lung voxels) or "grid" (a blind regular grid).
        decoder: "upsample" (UpSampling3D + Conv3D) or "transpose" (the published stride-2
            Conv3DTranspose, which leaves checkerboard artefacts); see
            `kdsb.models.gmcae.build_gmcae`.
        clipnorm: per-variable gradient clipping norm (0: none).
        variance_floor: smallest mixture variance, normalised HU².
    """

    batch_size: int = option(16, "patches per batch (global, over all devices)", type=int)
    keep_checkpoints: int | None = option(
        3, "newest epoch checkpoints kept on disk (and the best epoch's)", type=int
    )
    steps_per_epoch: int = option(200, "training batches per epoch", type=int)
    validation_steps: int = option(16, "validation batches (a fixed set of patches)", type=int)
    mixtures: int = option(4, "mixture components m", type=int)
    width: int = option(
        64, "base filters of the encoder (64 as published; 4-16 for CPU demos)", type=int
    )
    patch_size: int = option(32, "patch edge in voxels (multiple of 8)", type=int)
    patches_per_volume: int = option(
        8, "patches read per visit of a volume (with --patch-cache: the validation patches' "
        "only)", type=int)
    patch_cache: int = option(
        0, "extract this many lung patches per training volume once, into memory-mapped "
        "shards in DATA_DIR/.patch_cache, and train from them (whole-batch symmetries; fast "
        "enough to feed a GPU); 0: stream patches from the volume files", type=int,
    )
    sampling: str = option(
        "lung", "where patches come from: lung voxels or a blind grid", choices=SAMPLINGS
    )
    decoder: str = option(
        DEFAULT_DECODER, "decoder: upsample (nearest-neighbour upsampling + Conv3D: no "
        "checkerboard, lower NLL in benchmarks/gmcae_likelihood.py) or transpose (the "
        "published stride-2 Conv3DTranspose, which runs saved before this option existed "
        "have, and resume with)", choices=DECODERS,
    )
    clipnorm: float = option(
        1.0, "clip each variable's gradient to this L2 norm, separately (Keras clipnorm, not a "
        "global norm; 0: no clipping)", type=float,
    )
    variance_floor: float = option(
        DEFAULT_VARIANCE_FLOOR, "smallest mixture variance (normalised HU²)", type=float,
    )

    RUN_KIND: ClassVar[str] = "GMCAE"

    @classmethod
    def kind_of_saved(cls, saved):
        """As `RunOptions.kind_of_saved`; a record without the kind naming a `head` is a
        classifier run's (found in review: resumed as a GMCAE run, it was clobbered)."""
        if runs.RUN_KIND_KEY not in saved and "head" in saved:
            return "classifier"
        return super().kind_of_saved(saved)

    @classmethod
    def from_saved(cls, saved):
        """Options from a config.json; one saved before `--decoder` existed used "transpose"."""
        return super().from_saved({"decoder": LEGACY_DECODER, **saved})

    def checks(self) -> list[tuple[bool, str, Any]]:
        return [
            *super().checks(),
            (self.steps_per_epoch >= 1, "--steps-per-epoch >= 1", self.steps_per_epoch),
            (self.validation_steps >= 1, "--validation-steps >= 1", self.validation_steps),
            (self.mixtures >= 1, "--mixtures >= 1", self.mixtures),
            (self.width >= 1, "--width >= 1", self.width),
            (self.patch_size >= 8 and self.patch_size % 8 == 0,
             "--patch-size a multiple of 8 (the encoder halves it three times)", self.patch_size),
            (self.patches_per_volume >= 1, "--patches-per-volume >= 1", self.patches_per_volume),
            (self.patch_cache >= 0, "--patch-cache >= 0", self.patch_cache),
            (not self.patch_cache or self.sampling == "lung",
             "--patch-cache with --sampling lung", self.sampling),
            (self.sampling in SAMPLINGS, f"--sampling in {SAMPLINGS}", self.sampling),
            (self.decoder in DECODERS, f"--decoder in {DECODERS}", self.decoder),
            (self.clipnorm >= 0, "--clipnorm >= 0", self.clipnorm),
            (self.variance_floor > 0, "--variance-floor > 0", self.variance_floor),
        ]


def _volume_paths(data_dir: Path) -> tuple[dict[str, Path], tuple[float, float, float]]:
    """The volume files of `data_dir` by id, and the (z, y, x) spacing in mm they share."""
    from kdsb.data.inputs import common_spacing
    from kdsb.io import volumes

    found = volumes.list_volumes(data_dir)
    if len(found) < MIN_VOLUMES:
        raise UsageError(
            f"expected at least {MIN_VOLUMES} volume files (<id>.h5) in {data_dir} "
            f"(training and validation patients), received {len(found)}"
        )
    return found, common_spacing(list(found.values()))


def training_stream(paths: list[Path], data_dir: Path, options: GmcaeOptions, seed: int,
                    worker: runs.Worker | None = None):
    """Endless augmented training batches (x, x), x (batch, P, P, P, 1) normalised HU: from the
    patch cache (`--patch-cache N`, under `data_dir`) or streamed from the volume files; the
    stream of `train_gmcae` for the same `paths`, options and `seed`.

    Under multiworker, `worker` takes every `worker.count`-th volume from its index on, its own
    seed (`Worker.seed`) and batches of its share of `--batch-size`. Every worker builds (or
    finds) the cache of all volumes, so the cache is the same whatever the workers.
    """
    worker = worker or runs.Worker()
    own = paths[worker.index::worker.count]
    batch_size = options.batch_size // worker.count
    if options.patch_cache:
        from kdsb.data.patch_cache import build_patch_cache, cached_patch_dataset

        shards = build_patch_cache(paths, data_dir / PATCH_CACHE_DIR,
                                   patch_size=options.patch_size,
                                   per_volume=options.patch_cache, seed=options.seed)
        from kdsb.io.volumes import read_attrs

        return cached_patch_dataset(shards[worker.index::worker.count], batch_size=batch_size,
                                    spacing=read_attrs(paths[0])["spacing"],
                                    seed=worker.seed(seed))
    from kdsb.data.datasets import patch_dataset

    return patch_dataset(own, patch_size=options.patch_size, batch_size=batch_size,
                         patches_per_volume=options.patches_per_volume,
                         sampling=options.sampling, augment=True, seed=worker.seed(seed),
                         repeat=True)


def _check_spacing_unchanged(run_dir: Path, spacing: tuple[float, float, float]) -> None:
    """Refuse to resume a run on volumes of another spacing than it began with (its
    checkpoints learned the other scale; gmcae.json would be rewritten to the new one)."""
    from kdsb.data.inputs import GMCAE_INPUT_NAME, gmcae_spacing_of
    from kdsb.io.series import same_spacing

    if not (run_dir / GMCAE_INPUT_NAME).is_file():
        return
    begun = gmcae_spacing_of(run_dir / MODEL_NAME)
    if begun is not None and not same_spacing(begun, spacing):
        raise UsageError(f"expected --resume on volumes of the spacing the run began with, "
                         f"{tuple(begun)} mm ({run_dir / GMCAE_INPUT_NAME}), received "
                         f"{tuple(spacing)} mm: start a new RUN_DIR")


def validation_patches(paths: list[Path], options: GmcaeOptions):
    """A fixed array (n, P, P, P, 1) of un-augmented validation patches (normalised HU): the
    first `validation_steps` batches of a stream visiting `VALIDATION_CYCLE` volumes at once,
    so that every machine (a run resumed elsewhere, each worker of a multi-worker run) gets the
    same patches; the training stream's cycle follows the core count."""
    import numpy as np

    from kdsb.data.datasets import patch_dataset

    stream = patch_dataset(
        paths,
        patch_size=options.patch_size,
        batch_size=options.batch_size,
        patches_per_volume=options.patches_per_volume,
        sampling=options.sampling,
        augment=False,
        seed=options.seed + VALIDATION_SEED_OFFSET,
        repeat=True,
        cycle_length=VALIDATION_CYCLE,
    )
    batches = [x.numpy() for x, _ in stream.take(options.validation_steps)]
    return np.concatenate(batches)


def _build_model_fn(options: GmcaeOptions):
    def build():
        import keras

        from kdsb.models.gmcae import build_gmcae
        from kdsb.models.losses import GaussianMixtureNLL

        model = build_gmcae(
            patch_size=options.patch_size,
            width=options.width,
            mixtures=options.mixtures,
            variance_floor=options.variance_floor,
            decoder=options.decoder,
        )
        optimizer = keras.optimizers.Adam(
            learning_rate=options.lr, clipnorm=options.clipnorm or None
        )
        model.compile(
            optimizer=optimizer, loss=GaussianMixtureNLL(options.mixtures), jit_compile=False
        )
        return model

    return build


def _report(run_dir: Path, val_patches, baseline: float, n_train: int, n_val: int) -> dict:
    """Write the two plots from history.csv and the best model, then gmcae_summary.json (last:
    a finished run resumed returns it, without measuring anything again)."""
    import keras

    from kdsb.models import gmcae
    from kdsb.training import plots

    rows = runs.read_history(run_dir / runs.HISTORY_NAME)
    train_nll = [float(r["loss"]) for r in rows]
    val_nll = [float(r["val_loss"]) for r in rows]
    best_row = runs.best_row(rows, "val_loss", higher_is_better=False)  # the saved model's
    best_epoch = int(rows[best_row]["epoch"]) + 1
    summary = {
        "epochs_completed": len(rows),
        "best_epoch": best_epoch,
        "best_val_nll_per_voxel": val_nll[best_row],
        "final_val_nll_per_voxel": val_nll[-1],
        "final_train_nll_per_voxel": train_nll[-1],
        "single_gaussian_val_nll_per_voxel": baseline,
        "validation_patches": len(val_patches),
        "train_patients": n_train,
        "val_patients": n_val,
    }
    plots.plot_loss_curves(
        {"train": train_nll, "validation": val_nll},
        run_dir / LOSS_PLOT_NAME,
        ylabel="NLL per voxel (nats)",
        title="GMCAE training",
        baselines={"single Gaussian (validation)": baseline},
    )
    best_model = keras.saving.load_model(run_dir / MODEL_NAME, safe_mode=True)
    shown = val_patches[:RECONSTRUCTION_ROWS]
    plots.plot_reconstructions(
        shown,
        gmcae.reconstruct(best_model, shown),
        run_dir / RECONSTRUCTIONS_PLOT_NAME,
        title=f"validation patches, epoch {best_epoch}",
    )
    write_json(run_dir / SUMMARY_NAME, summary)  # last: the run's results are all written
    return summary


def train_gmcae(
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    options: GmcaeOptions | dict[str, Any],
    *,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Train (or resume) a GMCAE into `run_dir`, then write the plots and the summary.

    Under `--distribute multiworker` every worker runs this with the same arguments; the chief
    writes `run_dir`, the others only train (and return None).

    Args:
        data_dir: folder of `<id>.h5` volumes (at least two patients).
        run_dir: the run folder.
        options: the run's options, or the options given on the command line (a dict of some
            fields: the others keep their default, or their saved value when resuming).
        resume: continue from the newest checkpoint of `run_dir` with its saved options.

    Returns:
        gmcae_summary.json as a dict: epochs_completed, best_epoch, best_val_nll_per_voxel,
        final_val_nll_per_voxel, final_train_nll_per_voxel, single_gaussian_val_nll_per_voxel
        (NLL in nats per voxel), validation_patches, train_patients, val_patients. None on a
        worker other than the chief.

    Raises:
        UsageError: out-of-range options, fewer than 2 volumes, incompatible options on resume,
            resuming a run of another kind (config.json), another run writing `run_dir`,
            resuming on other patients (split.json) or volumes of another spacing (gmcae.json),
            a run folder holding checkpoints without `resume`; under multiworker, a missing or
            malformed TF_CONFIG, a batch size that is no multiple of the workers, or fewer
            training volumes than workers.
        StoreError: DATA_DIR is missing, a file of it is not a readable kdsb volume file, or
            its files differ in spacing.
        TrainingError: the loss became NaN or infinite (the last good checkpoint stays).
    """
    run_dir = Path(run_dir)
    options, start_epoch = runs.resolve_options(
        GmcaeOptions, options, run_dir, resume=resume, data_dir=data_dir
    )
    worker = runs.worker(options.distribute)
    with runs.sole_run(run_dir, "kdsb train-gmcae", worker.chief):
        return _train_held(Path(data_dir), run_dir, options, start_epoch, worker, resume)


def _train_held(data_dir: Path, run_dir: Path, options: GmcaeOptions, start_epoch: int,
                worker: runs.Worker, resume: bool) -> dict[str, Any] | None:
    """`train_gmcae` once its options are resolved and `run_dir` is this run's alone."""
    import tensorflow as tf

    from kdsb.data.datasets import split_patients
    from kdsb.data.inputs import save_gmcae_spacing
    from kdsb.models import gmcae

    summary_path = run_dir / SUMMARY_NAME
    # (Its checkpoints may have been deleted to save space: the best model stays.)
    trained = runs.last_checkpoint(run_dir) or (run_dir / MODEL_NAME).is_file()
    if (resume and trained and summary_path.is_file()
            and runs.finished_training(run_dir, options.epochs, options.patience,
                                        options.min_epochs)):
        # Its records stay as they are: measured again on a DATA_DIR given anew, the summary
        # would weigh the model and its baseline on other patients.
        logger.info("%s had finished training (%s): nothing to train", run_dir,
                    runs.FINISHED_NAME)
        return read_json(summary_path) if worker.chief else None
    volumes, spacing = _volume_paths(Path(data_dir))
    if options.patch_cache and not (data_dir / PATCH_CACHE_DIR).is_dir():
        # Before any record is written (found by a user's trial: a read-only DATA_DIR failed
        # with a raw OS error once the run had begun), on every worker (each builds or finds
        # the cache); a cache already there may be complete and need no writing (review).
        from kdsb.io.paths import require_output_dir

        require_output_dir(data_dir / PATCH_CACHE_DIR, "a folder for --patch-cache's shards "
                           "(DATA_DIR/.patch_cache)")
    train_ids, val_ids = split_patients(
        list(volumes), val_fraction=options.val_fraction, seed=options.seed
    )
    if options.batch_size % worker.count or len(train_ids) < worker.count:
        raise UsageError(
            f"expected --batch-size a multiple of the {worker.count} workers and at least as "
            f"many training volumes, received --batch-size {options.batch_size} and "
            f"{len(train_ids)} training volumes"
        )
    if resume:
        _check_spacing_unchanged(run_dir, spacing)
    # Before config.json is written: a refused resume changes nothing.
    runs.pin_split(run_dir, {"train_ids": train_ids, "val_ids": val_ids}, resume, worker.chief)
    runs.begin(run_dir, options, data_dir=data_dir, resume=resume)
    runs.note_volumes(run_dir, volumes, resume, worker.chief)
    if worker.chief:
        # A summary of fewer epochs than this run will have trained, or a former run's
        # (before the patch cache's minutes: the shortcut above must not find it).
        summary_path.unlink(missing_ok=True)
        save_gmcae_spacing(run_dir, spacing)
    logger.info("%d training and %d validation patients", len(train_ids), len(val_ids))
    train_data = training_stream(
        [volumes[i] for i in train_ids], Path(data_dir), options, options.seed + start_epoch,
        worker,
    )
    val_patches = validation_patches([volumes[i] for i in val_ids], options)
    val_data = tf.data.Dataset.from_tensor_slices((val_patches, val_patches)).batch(
        options.batch_size
    )
    baseline = gmcae.mixture_nll_of_single_gaussian(val_patches)
    runs.train(
        _build_model_fn(options), train_data, val_data, run_dir, options, resume=resume,
        best_name=MODEL_NAME, steps_per_epoch=options.steps_per_epoch,
    )
    summary = None
    if worker.chief:
        summary = _report(run_dir, val_patches, baseline, len(train_ids), len(val_ids))
    runs.wait_for_workers(options.distribute)
    return summary
