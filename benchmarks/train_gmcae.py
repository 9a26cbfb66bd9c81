#!/usr/bin/env python
"""GMCAE training speed: input pipeline vs model vs end to end, and FLOP/s against a matmul.

For each base width and precision it measures, in patches per second:

- pipeline: `kdsb.data.datasets.patch_dataset` alone (HDF5 reads, lung sampling, 48-fold
  augmentation, batching), iterated without a model;
- model: training steps (`model.fit`) on one fixed in-memory batch, so input costs nothing;
- end to end: training steps fed by the pipeline (the way `kdsb train-gmcae` trains).

The target (issue 3) is end to end ≥ 90% of model alone: the model, not the input, sets the pace.
It also reports the achieved FLOP/s of the model-alone steps as a fraction of a large matmul's
FLOP/s measured in the same run and precision. Training FLOPs are counted analytically from the
Conv3D, Conv3DTranspose and Dense layers (2 FLOPs per multiply-add, forward ×3 for forward plus
backward); activations, the loss and the optimizer are left out, so the fraction is a slight
underestimate.

Phantom volumes are written to a temporary folder (or pass --data-dir with kdsb volumes).
Usage: .venv/bin/python benchmarks/train_gmcae.py [--widths 64 8] [--batch-size 4] ...
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PHANTOM_SHAPE = (96, 128, 128)  # (z, y, x) voxels of 1 mm: a small chest
PHANTOM_VOLUMES = 8
TISSUE_HU, VESSEL_HU = 40, 40
NOISE_HU = 20
MATMUL_REPEATS = 5
FLOPS_PER_MAC = 2
MIN_TIMED_STEPS = 3
MAX_STEPS = 100_000  # fit's step budget; the step clock stops it much earlier
TRAIN_FLOPS_FACTOR = 3  # backward ≈ 2 × forward (gradients for inputs and for weights)


def write_phantoms(folder: Path, count: int, seed: int) -> list[Path]:
    """Write `count` phantom chests (body, two lungs with vessels) as kdsb volume files."""
    from scipy import ndimage

    from kdsb.io import volumes
    from kdsb.preprocessing.hu import AIR_HU, PARENCHYMA_HU

    rng = np.random.default_rng(seed)
    z, y, x = np.indices(PHANTOM_SHAPE, dtype=np.float32)
    nz, ny, nx = PHANTOM_SHAPE
    body = ((y - ny / 2) / (0.48 * ny)) ** 2 + ((x - nx / 2) / (0.48 * nx)) ** 2 < 1
    lung = np.zeros(PHANTOM_SHAPE, bool)
    for centre in (0.28 * nx, 0.72 * nx):
        lung |= (
            ((z - nz / 2) / (0.45 * nz)) ** 2
            + ((y - ny / 2) / (0.32 * ny)) ** 2
            + ((x - centre) / (0.19 * nx)) ** 2
        ) < 1
    paths = []
    for i in range(count):
        hu = np.full(PHANTOM_SHAPE, AIR_HU, np.float32)
        hu[body] = TISSUE_HU
        hu[lung] = PARENCHYMA_HU
        vessels = ndimage.gaussian_filter(rng.normal(size=PHANTOM_SHAPE).astype(np.float32), 1.5)
        hu[lung & (vessels > 0.08)] = VESSEL_HU
        hu += rng.normal(0, NOISE_HU, PHANTOM_SHAPE).astype(np.float32)
        paths.append(
            volumes.write_volume(
                volumes.volume_path(folder, f"phantom{i:02d}"), hu, lung, (1.0,) * 3, (0.0,) * 3
            )
        )
    return paths


def _layer_macs(layer, input_shape, output_shape) -> int:
    """Multiply-adds per sample of one Conv3D, Conv3DTranspose or Dense layer (else 0)."""
    import keras

    if isinstance(layer, keras.layers.Conv3DTranspose):
        # Every input voxel is scattered through the whole kernel to every output channel.
        spatial = math.prod(input_shape[1:-1])
        return spatial * math.prod(layer.kernel_size) * input_shape[-1] * layer.filters
    if isinstance(layer, keras.layers.Conv3D):
        spatial = math.prod(output_shape[1:-1])
        return spatial * math.prod(layer.kernel_size) * input_shape[-1] * layer.filters
    if isinstance(layer, keras.layers.Dense):
        return math.prod(input_shape[1:]) * layer.units
    return 0


def training_flops_per_patch(model, patch_shape: tuple[int, ...]) -> int:
    """Training FLOPs per patch (forward + backward) of the model's conv and dense layers.

    Top-level layers have concrete symbolic shapes. A nested model (the encoder, built for any
    input size) is walked as the chain of layers it is, propagating the concrete patch shape
    with `compute_output_shape`.
    """
    import keras

    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            shape = (1, *patch_shape)
            for inner in layer.layers:
                if isinstance(inner, keras.layers.InputLayer):
                    continue
                out = inner.compute_output_shape(shape)
                macs += _layer_macs(inner, shape, out)
                shape = out
        elif isinstance(layer, (keras.layers.Conv3D, keras.layers.Dense)):
            macs += _layer_macs(layer, layer.input.shape, layer.output.shape)
    return FLOPS_PER_MAC * TRAIN_FLOPS_FACTOR * macs


def matmul_flops_per_s(size: int, dtype: str) -> float:
    """FLOP/s of a size×size matmul in `dtype` (best of a few runs, after a warm-up)."""
    import tensorflow as tf

    a = tf.random.normal((size, size), dtype=tf.float32)
    a = tf.cast(a, dtype)
    b = tf.identity(a)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.linalg.matmul(x, y)[0], "float32")))
    matmul(a, b).numpy()
    best = math.inf
    for _ in range(MATMUL_REPEATS):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def time_pipeline(dataset, seconds: float, warmup: int) -> float:
    """Patches per second of iterating a dataset of (x, y) batches for about `seconds`."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    patches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        patches += int(next(iterator)[0].shape[0])
    return patches / (time.perf_counter() - start)


def time_fit(model, dataset, seconds: float, warmup: int, batch_size: int) -> float:
    """Patches per second of `model.fit` steps: batch size over the median step time.

    One `fit` call and one iterator: the tracing of the train step and the filling of the
    pipeline's buffers happen during the `warmup` steps, as they do once per run in real
    training. Steps are then timed for about `seconds` (at least `MIN_TIMED_STEPS`); the median
    step ignores the odd step slowed by other work on a shared machine.
    """
    import keras

    ends: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 >= warmup:
                ends.append(time.perf_counter())
                enough = len(ends) > MIN_TIMED_STEPS and ends[-1] - ends[0] >= seconds
                self.model.stop_training = enough

    model.fit(dataset, epochs=1, steps_per_epoch=MAX_STEPS, verbose=0, shuffle=False,
              callbacks=[StepClock()])
    return batch_size / float(np.median(np.diff(ends)))


def build_compiled(width: int, args: argparse.Namespace):
    import keras

    from kdsb.models.gmcae import build_gmcae
    from kdsb.models.losses import GaussianMixtureNLL

    model = build_gmcae(patch_size=args.patch_size, width=width, mixtures=args.mixtures)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0),
        loss=GaussianMixtureNLL(args.mixtures),
        jit_compile=False,
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="kdsb volume files (default: phantoms in a temporary folder)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--mixtures", type=int, default=4)
    parser.add_argument("--patches-per-volume", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds of model-alone and end-to-end timing")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="timed seconds per measurement (at least 3 steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import kdsb  # noqa: F401  (registers kdsb's Keras objects)
    from kdsb.data.datasets import patch_dataset

    with tempfile.TemporaryDirectory() as temp:
        if args.data_dir is None:
            paths = write_phantoms(Path(temp), PHANTOM_VOLUMES, args.seed)
        else:
            paths = sorted(Path(args.data_dir).glob("*.h5"))

        def pipeline():
            return patch_dataset(paths, patch_size=args.patch_size, batch_size=args.batch_size,
                                 patches_per_volume=args.patches_per_volume, sampling="lung",
                                 augment=True, seed=args.seed, repeat=True)

        pipeline_rate = time_pipeline(pipeline(), args.seconds, args.warmup)
        matmul = {
            "float32": matmul_flops_per_s(args.matmul_size, "float32"),
            "mixed_bfloat16": matmul_flops_per_s(args.matmul_size, "bfloat16"),
            "mixed_float16": matmul_flops_per_s(args.matmul_size, "float16"),
        }
        print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, "
              f"keras {keras.__version__}; batch {args.batch_size}, patch {args.patch_size}³, "
              f"m={args.mixtures}, best of {args.rounds} medians over ~{args.seconds:g} s")
        print(f"input pipeline alone: {pipeline_rate:.1f} patches/s")
        for dtype, rate in matmul.items():
            print(f"matmul {args.matmul_size}² {dtype}: {rate / 1e9:.1f} GFLOP/s")
        columns = ("width", "precision", "model patches/s", "end-to-end patches/s", "e2e/model",
                   "GFLOP/patch", "GFLOP/s", "of matmul")
        print("| " + " | ".join(columns) + " |")
        print("|---" * len(columns) + "|")
        patch_shape = (args.patch_size,) * 3 + (1,)
        fixed = np.random.default_rng(args.seed).uniform(-1, 1, (args.batch_size, *patch_shape))
        fixed = tf.constant(fixed.astype("float32"))
        in_memory = tf.data.Dataset.from_tensors((fixed, fixed)).repeat()
        for width in args.widths:
            for precision in args.precisions:
                keras.mixed_precision.set_global_policy(precision)
                keras.utils.set_random_seed(args.seed)
                model = build_compiled(width, args)
                flops = training_flops_per_patch(model, patch_shape)
                # Alternate the two measurements and keep the best of each: other work on a
                # shared machine only ever slows a measurement down.
                model_rate = e2e_rate = 0.0
                for _ in range(args.rounds):
                    model_rate = max(model_rate, time_fit(
                        model, in_memory, args.seconds, args.warmup, args.batch_size))
                    e2e_rate = max(e2e_rate, time_fit(
                        model, pipeline(), args.seconds, args.warmup, args.batch_size))
                achieved = flops * model_rate
                print(f"| {width} | {precision} | {model_rate:.2f} | {e2e_rate:.2f} | "
                      f"{e2e_rate / model_rate:.0%} | {flops / 1e9:.2f} | {achieved / 1e9:.1f} | "
                      f"{achieved / matmul[precision]:.0%} |", flush=True)
                keras.backend.clear_session()
        keras.mixed_precision.set_global_policy("float32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
