#!/usr/bin/env python
"""GMCAE training speed: model alone vs end to end, oneDNN off vs on, FLOP/s against a matmul.

TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, when it loads, so each setting (`--onednn 0 1`)
runs in its own child process on the same phantom volumes. Each child measures, in patches per
second:

- the input pipelines alone: "stream" (`patch_dataset`: HDF5 reads, lung sampling, a symmetry
  per patch; `kdsb train-gmcae`'s default) and "cache" (`cached_patch_dataset` on the patch
  cache, `train-gmcae --patch-cache N`; built once before timing);
- model: training steps (`model.fit`) on one fixed in-memory batch, so input costs nothing;
- end to end: training steps fed by each pipeline.

The target (issue 11) is end to end ≥ 90% of model alone at every width. It also reports the
achieved FLOP/s of the model-alone steps as a fraction of a large matmul's FLOP/s measured in
the same process and precision. Training FLOPs are counted from the layers the model has
(Conv3D, Conv3DTranspose, Dense; 2 FLOPs per multiply-add, forward ×3 for forward plus
backward); activations, the loss and the optimizer are left out, so the fraction is a slight
underestimate. A row whose first step (tracing included) takes longer than `--slow-step-s` is
reported as skipped (bfloat16 on a CPU without AVX-512 falls back to slow Eigen kernels).

Phantom volumes are written to a temporary folder (or pass --data-dir with kdsb volumes).
Usage: .venv/bin/python benchmarks/train_gmcae.py [--onednn 0 1] [--widths 64 8] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
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
MATMUL_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def phantom_chest(shape: tuple[int, int, int], rng: np.random.Generator):
    """One phantom chest (body, two lungs with vessels, noise) of `shape` (z, y, x) 1 mm voxels:
    (hu float32, lung mask bool)."""
    from scipy import ndimage

    from kdsb.hu import AIR_HU, PARENCHYMA_HU

    z, y, x = np.indices(shape, dtype=np.float32)
    nz, ny, nx = shape
    body = ((y - ny / 2) / (0.48 * ny)) ** 2 + ((x - nx / 2) / (0.48 * nx)) ** 2 < 1
    lung = np.zeros(shape, bool)
    for centre in (0.28 * nx, 0.72 * nx):
        lung |= (
            ((z - nz / 2) / (0.45 * nz)) ** 2
            + ((y - ny / 2) / (0.32 * ny)) ** 2
            + ((x - centre) / (0.19 * nx)) ** 2
        ) < 1
    hu = np.full(shape, AIR_HU, np.float32)
    hu[body] = TISSUE_HU
    hu[lung] = PARENCHYMA_HU
    vessels = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.5)
    hu[lung & (vessels > 0.08)] = VESSEL_HU
    hu += rng.normal(0, NOISE_HU, shape).astype(np.float32)
    return hu, lung


def write_phantoms(folder: Path, count: int, seed: int,
                   shape: tuple[int, int, int] = PHANTOM_SHAPE) -> list[Path]:
    """Write `count` phantom chests (`phantom_chest`) as kdsb volume files."""
    from kdsb.io import volumes

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        hu, lung = phantom_chest(shape, rng)
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


# Named one by one: a Conv3DTranspose is no Conv3D in Keras 3 (until 2026-12-03 the transposed
# decoder's layers, ~80 % of its FLOPs, went uncounted).
COUNTED_LAYERS = ("Conv3D", "Conv3DTranspose", "Dense")


def training_flops_per_patch(model, patch_shape: tuple[int, ...]) -> int:
    """Training FLOPs per patch (forward + backward) of the model's conv and dense layers.

    Top-level layers have concrete symbolic shapes. A nested model (the encoder, built for any
    input size) is walked as the chain of layers it is, propagating the concrete patch shape
    with `compute_output_shape`.
    """
    import keras

    counted = tuple(getattr(keras.layers, name) for name in COUNTED_LAYERS)
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
        elif isinstance(layer, counted):
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

    model = build_gmcae(patch_size=args.patch_size, width=width, mixtures=args.mixtures,
                        decoder=args.decoder)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0),
        loss=GaussianMixtureNLL(args.mixtures),
        jit_compile=False,
    )
    return model


def first_step_seconds(model, batch) -> float:
    """Seconds of one `train_on_batch` (tracing included): tells whether a row is affordable."""
    start = time.perf_counter()
    model.train_on_batch(batch, batch)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, paths: list[Path], cache_dir: Path) -> dict:
    """Every measurement of one process (whose oneDNN setting is fixed at TensorFlow's import):
    matmul references, the pipelines alone, and one row per width and precision."""
    import keras
    import tensorflow as tf

    import kdsb  # noqa: F401  (registers kdsb's Keras objects)
    from kdsb.data.datasets import patch_dataset
    from kdsb.data.patch_cache import build_patch_cache, cached_patch_dataset
    from kdsb.io.volumes import read_attrs

    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    shards = build_patch_cache(paths, cache_dir, patch_size=args.patch_size,
                               per_volume=args.cache_per_volume, seed=args.seed)
    pipelines = {
        "stream": lambda: patch_dataset(
            paths, patch_size=args.patch_size, batch_size=args.batch_size,
            patches_per_volume=args.patches_per_volume, sampling="lung", augment=True,
            seed=args.seed, repeat=True),
        "cache": lambda: cached_patch_dataset(shards, batch_size=args.batch_size,
                                              spacing=read_attrs(paths[0])["spacing"],
                                              seed=args.seed),
    }
    result = {
        "onednn": os.environ["TF_ENABLE_ONEDNN_OPTS"],
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "pipeline": {name: time_pipeline(pipelines[name](), args.seconds, args.warmup)
                     for name in args.pipelines},
        "matmul": {precision: matmul_flops_per_s(args.matmul_size, dtype)
                   for precision, dtype in MATMUL_DTYPES.items()
                   if precision in args.precisions},
        "rows": [],
    }
    patch_shape = (args.patch_size,) * 3 + (1,)
    fixed = np.random.default_rng(args.seed).uniform(-1, 1, (args.batch_size, *patch_shape))
    fixed = tf.constant(fixed.astype("float32"))
    in_memory = tf.data.Dataset.from_tensors((fixed, fixed)).repeat()
    for width in args.widths:
        for precision in args.precisions:
            keras.mixed_precision.set_global_policy(precision)
            keras.utils.set_random_seed(args.seed)
            model = build_compiled(width, args)
            row = {"width": width, "precision": precision,
                   "flops": training_flops_per_patch(model, patch_shape),
                   "first_step_s": first_step_seconds(model, fixed)}
            if row["first_step_s"] <= args.slow_step_s:
                # Alternate the measurements and keep the best of each: other work on a shared
                # machine only ever slows a measurement down.
                row["model"] = 0.0
                row.update({name: 0.0 for name in args.pipelines})
                for _ in range(args.rounds):
                    row["model"] = max(row["model"], time_fit(
                        model, in_memory, args.seconds, args.warmup, args.batch_size))
                    for name in args.pipelines:
                        row[name] = max(row[name], time_fit(
                            model, pipelines[name](), args.seconds, args.warmup,
                            args.batch_size))
            result["rows"].append(row)
            print(f"oneDNN {result['onednn']}: {row}", file=sys.stderr, flush=True)
            keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    return result


def print_tables(results: list[dict], args: argparse.Namespace) -> None:
    """Markdown tables of the runs (one per oneDNN setting), the matmul rates beside them."""
    first = results[0]
    print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {first['tensorflow']}, keras "
          f"{first['keras']}; decoder {args.decoder}, batch {args.batch_size}, patch "
          f"{args.patch_size}³, m={args.mixtures}, best of {args.rounds} medians over "
          f"~{args.seconds:g} s; load average {Path('/proc/loadavg').read_text().split()[:3]}")
    for result in results:
        rates = ", ".join(f"{name} {rate:.0f}" for name, rate in result["pipeline"].items())
        matmul = ", ".join(f"{precision} {rate / 1e9:.1f}"
                           for precision, rate in result["matmul"].items())
        print(f"oneDNN {result['onednn']}: input pipeline alone (patches/s): {rates}; "
              f"matmul {args.matmul_size}² (GFLOP/s): {matmul}")
    columns = ["oneDNN", "width", "precision", "model patches/s"]
    for name in args.pipelines:
        columns += [f"e2e {name} patches/s", f"{name} / model"]
    columns += ["GFLOP per patch", "GFLOP/s", "of matmul"]
    print("\n| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for result in results:
        for row in result["rows"]:
            cells = [result["onednn"], row["width"], row["precision"]]
            if "model" not in row:
                skipped = f"skipped: first step {row['first_step_s']:.0f} s"
                print("| " + " | ".join(map(str, cells)) + f" | {skipped} |"
                      + " |" * (len(columns) - 4))
                continue
            cells.append(f"{row['model']:.2f}")
            for name in args.pipelines:
                cells += [f"{row[name]:.2f}", f"{row[name] / row['model']:.0%}"]
            achieved = row["flops"] * row["model"]
            cells += [f"{row['flops'] / 1e9:.2f}", f"{achieved / 1e9:.1f}",
                      f"{achieved / result['matmul'][row['precision']]:.0%}"]
            print("| " + " | ".join(map(str, cells)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="kdsb volume files (default: phantoms in a temporary folder)")
    parser.add_argument("--onednn", nargs="+", choices=("0", "1"), default=["0", "1"],
                        help="TF_ENABLE_ONEDNN_OPTS of each run (one process each)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--precisions", nargs="+", choices=tuple(MATMUL_DTYPES),
                        default=["float32", "mixed_bfloat16"])
    parser.add_argument("--decoder", choices=("upsample", "transpose"), default="upsample")
    parser.add_argument("--pipelines", nargs="*", choices=("stream", "cache"),
                        default=["stream", "cache"],
                        help="end-to-end inputs: streamed from HDF5 (train-gmcae's default) "
                        "or the patch cache (--patch-cache)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--mixtures", type=int, default=4)
    parser.add_argument("--patches-per-volume", type=int, default=8)
    parser.add_argument("--cache-per-volume", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds of model-alone and end-to-end timing")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="timed seconds per measurement (at least 3 steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--slow-step-s", type=float, default=60.0,
                        help="skip a row whose first step (tracing included) takes longer")
    parser.add_argument("--inter-op-threads", type=int, default=0,
                        help="tf.config.threading inter-op threads (0: TensorFlow's choice)")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-output", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temp:
        if args.data_dir is None:
            paths = write_phantoms(Path(temp), PHANTOM_VOLUMES, args.seed)
        else:
            paths = sorted(Path(args.data_dir).glob("*.h5"))
        if args.child_output is not None:
            result = measure(args, paths, Path(temp) / "patch_cache")
            args.child_output.write_text(json.dumps(result))
            return 0
        # oneDNN is chosen when TensorFlow loads: one child process per setting, same data.
        results = []
        for setting in args.onednn:
            output = Path(temp) / f"onednn{setting}.json"
            child = argv if argv is not None else sys.argv[1:]
            command = [sys.executable, __file__, *child, "--data-dir", str(paths[0].parent),
                       "--child-output", str(output)]
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting}
            subprocess.run(command, env=env, check=True)
            results.append(json.loads(output.read_text()))
        print_tables(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
