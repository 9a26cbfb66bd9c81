"""`kdsb train-gmcae DATA_DIR RUN_DIR`: train the Gaussian mixture convolutional autoencoder.

Patients of DATA_DIR (kdsb HDF5 volumes) are split into training and validation sets by patient.
Training streams augmented patches (`kdsb.data.datasets.patch_dataset`); validation uses one fixed
set of un-augmented patches, so the validation NLL of every epoch, and the single-Gaussian
baseline, are measured on the same voxels. Fitting goes through `kdsb.training.runs.fit`.

RUN_DIR receives:

- `config.json`: the run's options; `--resume` reuses them and refuses incompatible changes
  (only --epochs, --steps-per-epoch, --distribute and --keep-checkpoints may change);
- `gmcae.keras` (best by validation NLL), `checkpoints/`, `history.csv`, `logs/` (see
  `kdsb.training.runs`);
- `loss.png`: training and validation NLL per voxel by epoch, with the baseline;
- `reconstructions.png`: central slices of validation patches beside their reconstructions;
- `gmcae_summary.json`: best and final validation NLL per voxel and the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kdsb.errors import UsageError
from kdsb.io.atomic import write_json

logger = logging.getLogger(__name__)

HELP = "train the GMCAE on 3D lung patches (unsupervised, Gaussian mixture NLL)"

CONFIG_NAME = "config.json"
MODEL_NAME = "gmcae.keras"
SUMMARY_NAME = "gmcae_summary.json"
LOSS_PLOT_NAME = "loss.png"
RECONSTRUCTIONS_PLOT_NAME = "reconstructions.png"
RECONSTRUCTION_ROWS = 4
MIN_VOLUMES = 2  # one for training, one for validation
# Validation patches come from their own seeded stream, apart from the training stream.
VALIDATION_SEED_OFFSET = 1_000_003

# Options defining the run, with their defaults. The parser leaves an option out of the
# namespace when it is not given (argparse.SUPPRESS), so a resumed run can tell "not given"
# (keep the saved value) from "given" (check that it is compatible).
DEFAULTS: dict[str, object] = {
    "epochs": 20,
    "steps_per_epoch": 200,
    "validation_steps": 16,
    "batch_size": 16,
    "mixtures": 4,
    "width": 64,
    "patch_size": 32,
    "patches_per_volume": 8,
    "sampling": "lung",
    "lr": 1e-3,
    "clipnorm": 1.0,
    "variance_floor": None,  # None: kdsb.models.layers.DEFAULT_VARIANCE_FLOOR
    "precision": "float32",
    "seed": 0,
    "val_fraction": 0.2,
    "distribute": "none",
    "keep_checkpoints": 3,
}
# Options a resumed run may change; every other one must keep its saved value.
RESUMABLE_CHANGES = ("epochs", "steps_per_epoch", "distribute", "keep_checkpoints")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, received {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add train-gmcae's arguments; options left out keep their default (or saved) value."""
    parser.add_argument("data_dir", type=Path, help="folder of kdsb volume files (<id>.h5)")
    parser.add_argument("run_dir", type=Path, help="folder for the model, checkpoints and plots")

    def option(flag: str, help_text: str, **kwargs) -> None:
        key = flag.removeprefix("--").replace("-", "_")
        default = DEFAULTS[key]
        shown = "kdsb.models.layers.DEFAULT_VARIANCE_FLOOR" if default is None else default
        parser.add_argument(
            flag, default=argparse.SUPPRESS, help=f"{help_text} (default: {shown})", **kwargs
        )

    option("--epochs", "total epochs of the run", type=_positive_int)
    option("--steps-per-epoch", "training batches per epoch", type=_positive_int)
    option("--validation-steps", "validation batches (a fixed set of patches)", type=_positive_int)
    option("--batch-size", "patches per batch (global, over all devices)", type=_positive_int)
    option("--mixtures", "mixture components m", type=_positive_int)
    option("--width", "base filters of the encoder (64 as published; 4-16 for CPU demos)",
           type=_positive_int)
    option("--patch-size", "patch edge in voxels (multiple of 8)", type=_positive_int)
    option("--patches-per-volume", "patches read per visit of a volume", type=_positive_int)
    option("--sampling", "where patches come from: lung voxels or a blind grid",
           choices=("lung", "grid"))
    option("--lr", "Adam learning rate", type=_positive_float)
    option("--clipnorm",
           "clip each variable's gradient to this L2 norm, separately (Keras clipnorm, not a "
           "global norm; 0: no clipping)", type=float)
    option("--variance-floor", "smallest mixture variance (normalised HU²)", type=_positive_float)
    option("--precision", "layer precision (mixed_* compute in 16 bits, the loss in float32)",
           choices=("float32", "mixed_bfloat16", "mixed_float16"))
    option("--seed", "random seed (split, patches, weights)", type=int)
    option("--val-fraction", "fraction of patients for validation", type=float)
    option("--distribute", "none, or mirrored: data parallel over every GPU (or logical CPU)",
           choices=("none", "mirrored"))
    option("--keep-checkpoints", "newest epoch checkpoints kept on disk", type=_positive_int)
    parser.add_argument(
        "--resume", action="store_true",
        help="continue RUN_DIR from its last checkpoint with its saved options",
    )


def resolve_config(args: argparse.Namespace) -> dict:
    """The run's options: saved ones when resuming, checked against those given now."""
    given = {key: getattr(args, key) for key in DEFAULTS if hasattr(args, key)}
    data_dir = str(Path(args.data_dir).resolve())
    config_path = Path(args.run_dir) / CONFIG_NAME
    if args.resume and config_path.is_file():
        config = json.loads(config_path.read_text())
        for key, value in given.items():
            if key not in RESUMABLE_CHANGES and value != config.get(key):
                changeable = ", ".join(_flag(k) for k in RESUMABLE_CHANGES)
                raise UsageError(
                    f"expected {_flag(key)} {config.get(key)} as saved in {config_path} when "
                    f"resuming, received {value}; only {changeable} may change"
                )
        if config.get("data_dir") != data_dir:
            logger.warning("resuming with data from %s (the run began with %s)",
                           data_dir, config.get("data_dir"))
        config.update(given)
    else:
        config = {**DEFAULTS, **given}
    config["data_dir"] = data_dir
    if config["variance_floor"] is None:
        from kdsb.models.layers import DEFAULT_VARIANCE_FLOOR

        config["variance_floor"] = DEFAULT_VARIANCE_FLOOR
    if not 0.0 < config["val_fraction"] < 1.0:
        raise UsageError(f"expected --val-fraction in (0, 1), received {config['val_fraction']}")
    if config["clipnorm"] < 0:
        raise UsageError(f"expected --clipnorm >= 0, received {config['clipnorm']}")
    return config


def _volume_paths(data_dir: Path) -> dict[str, Path]:
    from kdsb.commands import require_dir
    from kdsb.io import volumes

    folder = require_dir(data_dir, "DATA_DIR, a folder of kdsb volume files")
    volume_files = volumes.list_volumes(folder)
    if len(volume_files) < MIN_VOLUMES:
        raise UsageError(
            f"expected at least {MIN_VOLUMES} volume files (<id>.h5) in {data_dir} "
            f"(training and validation patients), received {len(volume_files)}"
        )
    return volume_files


def _validation_patches(paths: list[Path], config: dict):
    """A fixed array (n, P, P, P, 1) of un-augmented validation patches (normalised HU)."""
    import numpy as np

    from kdsb.data.datasets import patch_dataset

    stream = patch_dataset(
        paths,
        patch_size=config["patch_size"],
        batch_size=config["batch_size"],
        patches_per_volume=config["patches_per_volume"],
        sampling=config["sampling"],
        augment=False,
        seed=config["seed"] + VALIDATION_SEED_OFFSET,
        repeat=True,
    )
    batches = [x.numpy() for x, _ in stream.take(config["validation_steps"])]
    return np.concatenate(batches)


def _build_model_fn(config: dict):
    def build():
        import keras

        from kdsb.models.gmcae import build_gmcae
        from kdsb.models.losses import GaussianMixtureNLL

        model = build_gmcae(
            patch_size=config["patch_size"],
            width=config["width"],
            mixtures=config["mixtures"],
            variance_floor=config["variance_floor"],
        )
        optimizer = keras.optimizers.Adam(
            learning_rate=config["lr"], clipnorm=config["clipnorm"] or None
        )
        model.compile(
            optimizer=optimizer, loss=GaussianMixtureNLL(config["mixtures"]), jit_compile=False
        )
        return model

    return build


def run(args: argparse.Namespace) -> int:
    """Train (or resume), then write the plots and the summary; returns the exit status.

    Raises:
        UsageError: a missing DATA_DIR, fewer than 2 volumes, incompatible options on resume,
            or a RUN_DIR holding checkpoints without --resume.
        StoreError: a file of DATA_DIR is not a readable kdsb volume file.
        TrainingError: the loss became NaN or infinite (the last good checkpoint stays).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from kdsb.data.datasets import check_volume_files, patch_dataset, split_patients
    from kdsb.models import gmcae
    from kdsb.training import plots, runs

    run_dir = Path(args.run_dir)
    config = resolve_config(args)
    # Checked before config.json is written, so a refused run leaves the old run's options.
    last = runs.check_run_dir(run_dir, args.resume)
    volumes = _volume_paths(Path(args.data_dir))
    check_volume_files(list(volumes.values()))
    train_ids, val_ids = split_patients(
        list(volumes), val_fraction=config["val_fraction"], seed=config["seed"]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_NAME, config)
    logger.info("%d training and %d validation patients", len(train_ids), len(val_ids))

    runs.configure_runtime(seed=config["seed"], precision=config["precision"])
    strategy = runs.distribution_strategy(config["distribute"])
    start_epoch = last[0] if last else 0
    train_data = patch_dataset(
        [volumes[i] for i in train_ids],
        patch_size=config["patch_size"],
        batch_size=config["batch_size"],
        patches_per_volume=config["patches_per_volume"],
        sampling=config["sampling"],
        augment=True,
        # A resumed run draws patches it has not seen yet rather than replaying epoch 1's.
        seed=config["seed"] + start_epoch,
        repeat=True,
    )
    val_patches = _validation_patches([volumes[i] for i in val_ids], config)
    val_data = tf.data.Dataset.from_tensor_slices((val_patches, val_patches)).batch(
        config["batch_size"]
    )
    baseline = gmcae.mixture_nll_of_single_gaussian(val_patches)

    quiet = getattr(args, "quiet", False)
    runs.fit(
        _build_model_fn(config),
        train_data,
        val_data,
        run_dir,
        epochs=config["epochs"],
        steps_per_epoch=config["steps_per_epoch"],
        resume=args.resume,
        best_name=MODEL_NAME,
        keep_checkpoints=config["keep_checkpoints"],
        strategy=strategy,
        verbose=0 if quiet else 1 if sys.stdout.isatty() else 2,
    )

    rows = runs.read_history(run_dir / runs.HISTORY_NAME)
    train_nll = [float(r["loss"]) for r in rows]
    val_nll = [float(r["val_loss"]) for r in rows]
    best_epoch = int(np.nanargmin(val_nll))
    summary = {
        "epochs_completed": len(rows),
        "best_epoch": best_epoch + 1,
        "best_val_nll_per_voxel": val_nll[best_epoch],
        "final_val_nll_per_voxel": val_nll[-1],
        "final_train_nll_per_voxel": train_nll[-1],
        "single_gaussian_val_nll_per_voxel": baseline,
        "validation_patches": len(val_patches),
        "train_patients": len(train_ids),
        "val_patients": len(val_ids),
    }
    write_json(run_dir / SUMMARY_NAME, summary)
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
        title=f"validation patches, epoch {best_epoch + 1}",
    )
    print(
        f"validation NLL per voxel: GMCAE {summary['best_val_nll_per_voxel']:.4f} "
        f"(best, epoch {best_epoch + 1}; final {summary['final_val_nll_per_voxel']:.4f}), "
        f"single Gaussian {baseline:.4f}"
    )
    print(f"model: {run_dir / MODEL_NAME}")
    return 0
