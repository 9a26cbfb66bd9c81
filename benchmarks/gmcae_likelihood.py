#!/usr/bin/env python
"""What the mixture buys: validation NLL per voxel of the GMCAE against plain baselines.

On patches of real anatomy (`kdsb synth --base <real chest CT>`, then `kdsb preprocess`: every
patient is the same real scan, varied and with lesions implanted), with one training budget
(steps, batch, seed, width, patch size, learning rate, data stream) for every model:

- (a) the GMCAE with the published decoder (`--decoder transpose`: stride-2 Conv3DTranspose);
- (b) the GMCAE with the upsample decoder (`--decoder upsample`: UpSampling3D + Conv3D);
- (c) the same autoencoder (one output channel, `--mse-decoder`) trained with a plain squared
  error on its mean output, then scored as a single isotropic Gaussian around its
  reconstruction, whose variance is its mean squared error on the training patches;
- (d) one Gaussian for every voxel, no autoencoder: mean and variance of the training patches.
  (d') is the same fitted to the validation patches themselves
  (`kdsb.models.gmcae.mixture_nll_of_single_gaussian`, the baseline `gmcae_summary.json`
  reports: in-sample, so slightly optimistic).

(a) and (b) train through `kdsb.training.gmcae.train_gmcae` (the `kdsb train-gmcae` run), (c) on
the same training stream (`training_stream`) from the same seed. Everything is scored on the
validation patches `train_gmcae` uses (un-augmented, lung-centred, from the held-out patients),
in nats per voxel (normalised HU, -1000 → -1, 400 → +1), after the last training step. Also
shown: the mean squared error of the reconstruction (GMCAE: the mean of the most responsible
component, `reconstruct`) and the share of the reconstructions' energy (mean removed) at the
Nyquist frequency of some axis: period-2 patterns, the checkerboard.

TensorFlow's oneDNN kernels are switched on (`TF_ENABLE_ONEDNN_OPTS=1`, unless set): on CPUs
where TensorFlow leaves them off by default (an AVX2 AMD EPYC) GMCAE training is 12–19× slower.

Usage: .venv/bin/python benchmarks/gmcae_likelihood.py [--work DIR] [--steps 300] ...
The cohort (DICOM, volumes) is kept under --work and reused by later runs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path.home() / ".cache" / "kdsb-bench" / "gmcae_likelihood"
VAL_FRACTION = 1 / 3  # 6 patients: 4 for training, 2 held out


def make_volumes(work: Path, patients: int, seed: int, base: Path | None) -> Path:
    """Real-anatomy volumes under `work/volumes_…` (`kdsb synth --base`, `kdsb preprocess`),
    made once and reused while `patients` of them are there; the folder names the base (its
    path's digest: another `--base` makes its own cohort, found in review)."""
    from kdsb.cli import main
    from kdsb.phantoms.layout import dicom_dir

    if base is None:
        sys.path.insert(0, str(REPO))
        from tests.realdata import reference_files

        files = reference_files()
        if files is None:
            raise SystemExit("the real chest CT is unavailable (offline?): pass --base SCAN")
        base = files / "aorta_report" / "example_ct.nii.gz"
    tag = hashlib.sha256(os.fsencode(Path(base).resolve())).hexdigest()[:8]
    volumes = work / f"volumes_{patients}_seed{seed}_base{tag}"
    if len(list(volumes.glob("*.h5"))) >= patients:
        return volumes
    cohort = work / f"cohort_{patients}_seed{seed}_base{tag}"
    start = time.perf_counter()
    if main(["-q", "synth", str(cohort), "--base", str(base), "--patients", str(patients),
             "--seed", str(seed), "--overwrite"]) != 0:
        raise SystemExit("kdsb synth failed")
    if main(["-q", "preprocess", str(dicom_dir(cohort)), str(volumes)]) != 0:
        raise SystemExit("kdsb preprocess failed")
    print(f"cohort of {patients} patients made in {time.perf_counter() - start:.0f} s: {volumes}")
    return volumes


def nyquist_share(patches: np.ndarray) -> float:
    """Fraction of the patches' energy (each patch's mean removed) at frequency 1/2 along at
    least one axis: 0 for smooth images, 1 - (1 - 1/P)³ ≈ 3/P for white noise, more for a
    checkerboard."""
    x = np.asarray(patches, np.float64).reshape(len(patches), *patches.shape[1:4])
    x = x - x.mean(axis=(1, 2, 3), keepdims=True)
    power = np.abs(np.fft.fftn(x, axes=(1, 2, 3))) ** 2
    half = x.shape[1] // 2
    nyquist = np.zeros(x.shape[1:], bool)
    nyquist[half], nyquist[:, half], nyquist[:, :, half] = True, True, True
    return float(power[:, nyquist].sum() / power.sum())


def gaussian_nll(targets: np.ndarray, means: np.ndarray | float, variance: float) -> float:
    """Mean NLL per voxel of `targets` under N(means, variance) voxel by voxel (nats)."""
    squared = np.mean((np.asarray(targets, np.float64) - means) ** 2)
    return 0.5 * math.log(2 * math.pi * variance) + squared / (2 * variance)


def score_gmcae(model, patches: np.ndarray) -> tuple[float, np.ndarray]:
    """(NLL per voxel of the mixture, reconstructions) on `patches`."""
    from kdsb.models import gmcae
    from kdsb.models.losses import gaussian_mixture_nll

    log_priors, variances, means = gmcae.mixture_params(model, patches)
    nll = gaussian_mixture_nll(patches.reshape(len(patches), -1), log_priors, variances, means)
    return float(np.mean(np.asarray(nll))), gmcae.reconstruct(model, patches)


def train_mse(paths, data_dir: Path, options):
    """The autoencoder with one mean, trained with a squared error on the GMCAE's stream."""
    import keras

    from kdsb.models.gmcae import build_gmcae
    from kdsb.training import runs
    from kdsb.training.gmcae import training_stream

    runs.configure_runtime(seed=options.seed, precision=options.precision)
    full = build_gmcae(patch_size=options.patch_size, width=options.width, mixtures=1,
                       variance_floor=options.variance_floor, decoder=options.decoder)
    model = keras.Model(full.input, full.get_layer("means").output, name="mse_autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(options.lr, clipnorm=options.clipnorm or None),
                  loss="mse", jit_compile=False)
    stream = training_stream(paths, data_dir, options, options.seed)
    model.fit(stream, epochs=options.epochs, steps_per_epoch=options.steps_per_epoch, verbose=0,
              shuffle=False)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="folder for the cohort and the runs (the cohort is reused)")
    parser.add_argument("--base", type=Path, default=None,
                        help="real chest CT (default: the totalsegmentator test CT)")
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--mixtures", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--validation-steps", type=int, default=16,
                        help="validation batches (also the number of training batches that "
                             "fit the variances of (c) and (d))")
    parser.add_argument("--mse-decoder", default="upsample", choices=("transpose", "upsample"))
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the weights and the training stream")
    parser.add_argument("--cohort-seed", type=int, default=0, help="seed of `kdsb synth`")
    args = parser.parse_args(argv)

    import keras

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices of new models
    from kdsb.data.datasets import split_patients
    from kdsb.io.volumes import list_volumes
    from kdsb.models.gmcae import mixture_nll_of_single_gaussian
    from kdsb.training import runs
    from kdsb.training.gmcae import GmcaeOptions, train_gmcae, validation_patches

    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = make_volumes(args.work, args.patients, args.cohort_seed, args.base)
    found = list_volumes(data_dir)
    options = GmcaeOptions(
        epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size,
        width=args.width, patch_size=args.patch_size, mixtures=args.mixtures, lr=args.lr,
        validation_steps=args.validation_steps, seed=args.seed, val_fraction=VAL_FRACTION,
        keep_checkpoints=1,
    )
    train_ids, val_ids = split_patients(list(found), val_fraction=VAL_FRACTION, seed=args.seed)
    train_paths, val_paths = [found[i] for i in train_ids], [found[i] for i in val_ids]
    val = validation_patches(val_paths, options)
    # Un-augmented patches of the training patients (the validation stream's seed, other files).
    train = validation_patches(train_paths, options)
    print(f"{len(train_ids)} training patients, {len(val_ids)} validation patients "
          f"({', '.join(val_ids)}); {len(val)} validation and {len(train)} training patches "
          f"of {args.patch_size}³; {args.steps * args.epochs} steps of {args.batch_size}")

    rows = []
    for label, decoder in (("(a) GMCAE, transpose decoder", "transpose"),
                           ("(b) GMCAE, upsample decoder", "upsample")):
        run_dir = args.work / "runs" / f"{decoder}_w{args.width}_p{args.patch_size}_" \
                                       f"s{args.steps}x{args.epochs}_seed{args.seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        start = time.perf_counter()
        train_gmcae(data_dir, run_dir, GmcaeOptions(**{**options.to_saved(), "decoder": decoder}))
        seconds = time.perf_counter() - start
        final = runs.last_checkpoint(run_dir)[1]
        model = keras.saving.load_model(final, safe_mode=True)
        nll, recon = score_gmcae(model, val)
        rows.append((label, nll, float(np.mean((recon - val) ** 2)), nyquist_share(recon),
                     seconds))
        print(rows[-1], flush=True)

    start = time.perf_counter()
    mse_options = GmcaeOptions(**{**options.to_saved(), "decoder": args.mse_decoder})
    model = train_mse(train_paths, data_dir, mse_options)
    seconds = time.perf_counter() - start
    variance = float(np.mean((model.predict(train, verbose=0) - train) ** 2))
    recon = model.predict(val, verbose=0)
    rows.append((f"(c) same autoencoder ({args.mse_decoder}), squared error",
                 gaussian_nll(val, recon, variance), float(np.mean((recon - val) ** 2)),
                 nyquist_share(recon), seconds))
    print(rows[-1], f"training MSE {variance:.5f}", flush=True)

    mean, variance = float(train.mean()), float(train.var())
    rows.append(("(d) one Gaussian, fitted on training patches", gaussian_nll(val, mean, variance),
                 float(np.mean((val - mean) ** 2)), math.nan, 0.0))
    rows.append(("(d') one Gaussian, fitted on the validation patches",
                 mixture_nll_of_single_gaussian(val), float(val.var()), math.nan, 0.0))

    print(f"\nvalidation patches: Nyquist share {nyquist_share(val):.4f}")
    print("\n| model | val NLL / voxel (nats) | val MSE | Nyquist share | train s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, nll, mse, share, seconds in rows:
        shown_share = "" if math.isnan(share) else f"{share:.4f}"
        shown_seconds = f"{seconds:.0f}" if seconds else ""
        print(f"| {label} | {nll:.4f} | {mse:.5f} | {shown_share} | {shown_seconds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
