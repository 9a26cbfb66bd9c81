#!/usr/bin/env python
"""GPU readiness: GMCAE training speed and whole-volume classifier memory on an NVIDIA GPU.

On a machine with a GPU (under 8 minutes), on phantoms:

1. a bf16 matmul's FLOP/s (fp16 on GPUs without bf16, compute capability < 8.0);
2. GMCAE training at width 64 in that mixed precision: patches/s of `model.fit` steps on one
   in-memory batch (model alone) and fed by the patch cache (`train-gmcae --patch-cache`,
   end to end), and the model's FLOP/s as a fraction of the matmul's;
3. one training step of the width-64 classifier (encoder + SPP head, Adam, binary
   cross-entropy, as `kdsb train-classifier` trains it) on a whole 1 mm phantom chest of a
   typical cropped-lung size (z, y, x) = 300×250×350: seconds per step and the peak GPU memory
   (`tf.config.experimental.get_memory_info`), then the volume grown by 1.25× per side until the
   step runs out of memory, the side cap or the time budget: the largest volume that fits.
   Twice: the whole volume at once, then with the encoder's first block in z-slabs
   (`train-classifier --tile-z`, `kdsb.models.slabs`).

Without a GPU it says so in one line, runs the same code on tiny sizes on the CPU (peak memory
is then the process's resident anonymous memory) and exits 0; `--smoke` does that on any
machine. `--host-memory` measures instead, on the CPU, the peak host memory of a classifier
step at the given shapes, for each `--tile-z` (0: whole volume) and `--precision`, each row in a
fresh process (memory the allocator kept from an earlier row would count): the estimate for
GPUs when none is at hand. Its step time is the last of `--steps` steps (the first one traces).

Usage: .venv/bin/python benchmarks/gpu_check.py [--smoke]
       .venv/bin/python benchmarks/gpu_check.py --host-memory 64x64x64 96x96x96 --tile-z 0 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from patch_pipeline import AnonymousPeak  # noqa: E402
from train_gmcae import (  # noqa: E402
    matmul_flops_per_s,
    phantom_chest,
    time_fit,
    training_flops_per_patch,
    write_phantoms,
)

GIB = 2**30
GROWTH = 1.25  # per side, between two volumes of the memory search
GPU_SIZES_GB = (24, 80)  # GPU sizes the report answers for


@dataclass(frozen=True)
class Sizes:
    """The sizes of one check: full on a GPU, tiny for the CPU smoke version."""

    width: int = 64
    patch_size: int = 32
    batch_size: int = 64
    seconds: float = 20.0
    warmup: int = 3
    phantoms: int = 8
    phantom_shape: tuple[int, int, int] = (96, 128, 128)
    cache_per_volume: int = 256
    matmul_size: int = 8192
    volume: tuple[int, int, int] = (300, 250, 350)  # (z, y, x) voxels of 1 mm
    classifier_steps: int = 3
    max_side: int = 768
    budget_s: float = 150.0  # of each volume search
    tile_z: int = 32  # z-slab of the tiled search (input voxels)


SMOKE = Sizes(width=2, patch_size=16, batch_size=2, seconds=0.2, warmup=1, phantoms=2,
              phantom_shape=(24, 32, 32), cache_per_volume=4, matmul_size=128,
              volume=(16, 16, 24), classifier_steps=1, max_side=28, budget_s=10.0,
              tile_z=4)


def mixed_precision_for(gpu) -> str:
    """"mixed_bfloat16" on GPUs with bf16 (compute capability ≥ 8.0), "mixed_float16" on older
    GPUs, "float32" for the CPU smoke version (bf16 convolutions fall back to Eigen on CPUs
    without AVX-512, ~50× slower: the smoke run would take minutes)."""
    import tensorflow as tf

    if gpu is None:
        return "float32"
    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
    return "mixed_bfloat16" if tuple(capability) >= (8, 0) else "mixed_float16"


def classifier(width: int, tile_z: int = 0):
    """The width-64 classifier as `kdsb train-classifier` trains it (fresh encoder weights),
    with the first block in z-slabs of `tile_z` voxels (0: the whole volume at once)."""
    import keras

    from kdsb.models.classifier import build_classifier
    from kdsb.models.gmcae import build_encoder
    from kdsb.models.slabs import compute_first_block_in_slabs

    model = build_classifier(build_encoder(width=width))
    model.compile(optimizer=keras.optimizers.Adam(1e-4, global_clipnorm=1.0),
                  loss=keras.losses.BinaryCrossentropy(), jit_compile=False)
    model.optimizer.build(model.trainable_variables)  # one trace of the step, as in gmcae_speed
    return compute_first_block_in_slabs(model, tile_z) if tile_z else model


def tiling(tile_z: int) -> str:
    return f"z-slabs of {tile_z}" if tile_z else "whole volume"


def classifier_step(model, shape: tuple[int, int, int], steps: int, gpu: bool) -> tuple[float, int]:
    """Train `steps` steps on one phantom chest of `shape`; (seconds of the last step, peak
    memory in bytes: the GPU's allocator peak, or the process's peak anonymous memory on the
    CPU). Raises tf.errors.ResourceExhaustedError when it does not fit."""
    import tensorflow as tf

    from kdsb.data.patches import normalize_hu

    hu, _ = phantom_chest(shape, np.random.default_rng(0))
    x = normalize_hu(hu)[np.newaxis, ..., np.newaxis]
    y = np.ones((1, 1), np.float32)
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    with AnonymousPeak() as host:
        for _ in range(steps):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            seconds = time.perf_counter() - start
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpu else host.peak * 2**20
    return seconds, int(peak)


def gmcae_speed(sizes: Sizes, precision: str, gpu: bool) -> None:
    """Print the matmul, the GMCAE's patches/s (model alone, end to end from the patch cache)
    and its fraction of the matmul's FLOP/s."""
    import keras
    import tensorflow as tf

    from kdsb.data.patch_cache import build_patch_cache, cached_patch_dataset
    from kdsb.io.volumes import read_attrs
    from kdsb.models.gmcae import build_gmcae
    from kdsb.models.losses import GaussianMixtureNLL

    matmul = matmul_flops_per_s(sizes.matmul_size, precision.removeprefix("mixed_"))
    print(f"matmul {sizes.matmul_size}² {precision.removeprefix('mixed_')}: "
          f"{matmul / 1e12:.2f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as temp:
        paths = write_phantoms(Path(temp), sizes.phantoms, 0, sizes.phantom_shape)
        shards = build_patch_cache(paths, Path(temp) / "cache", patch_size=sizes.patch_size,
                                   per_volume=sizes.cache_per_volume)
        spacing = read_attrs(paths[0])["spacing"]
        keras.mixed_precision.set_global_policy(precision)
        model = build_gmcae(patch_size=sizes.patch_size, width=sizes.width)
        model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0),
                      loss=GaussianMixtureNLL(4), jit_compile=False)
        # Slots built now, not in the first step: the step is traced once, not twice
        # (as `kdsb.training.runs` does before every fit).
        model.optimizer.build(model.trainable_variables)
        patch_shape = (sizes.patch_size,) * 3 + (1,)

        def cached():
            return cached_patch_dataset(shards, batch_size=sizes.batch_size, spacing=spacing)

        fixed = next(iter(cached()))[0]
        in_memory = tf.data.Dataset.from_tensors((fixed, fixed)).repeat()
        model_rate = time_fit(model, in_memory, sizes.seconds, sizes.warmup, sizes.batch_size)
        e2e_rate = time_fit(model, cached(), sizes.seconds, sizes.warmup, sizes.batch_size)
    flops = training_flops_per_patch(model, patch_shape)
    print(f"GMCAE width {sizes.width} {precision}, batch {sizes.batch_size}, "
          f"{sizes.patch_size}³ patches ({flops / 1e9:.1f} GFLOP per patch): model alone "
          f"{model_rate:.0f} patches/s ({flops * model_rate / matmul:.0%} of the matmul), "
          f"end to end from the patch cache {e2e_rate:.0f} patches/s "
          f"({e2e_rate / model_rate:.0%} of model alone)", flush=True)
    keras.backend.clear_session()


def classifier_memory(sizes: Sizes, precision: str, gpu: bool, tile_z: int) -> None:
    """Print the classifier's step time and peak memory on the typical volume, then grow the
    volume until it no longer fits (or the side cap, or the time budget); first block in
    z-slabs of `tile_z` voxels (0: the whole volume at once)."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(precision)
    model = classifier(sizes.width, tile_z)
    shape, largest = sizes.volume, None
    started = time.perf_counter()
    while max(shape) <= sizes.max_side and time.perf_counter() - started < sizes.budget_s:
        try:
            seconds, peak = classifier_step(model, shape, sizes.classifier_steps, gpu)
        except tf.errors.ResourceExhaustedError:
            print(f"classifier {tiling(tile_z)}, {'×'.join(map(str, shape))}: out of memory",
                  flush=True)
            break
        largest = shape
        fits = ", ".join(f"{'fits' if peak <= size * 1e9 else 'too big for'} {size} GB"
                         for size in GPU_SIZES_GB)
        print(f"classifier width {sizes.width} {precision}, {tiling(tile_z)}, volume "
              f"{'×'.join(map(str, shape))} "
              f"({math.prod(shape) / 1e6:.1f} M voxels): {seconds:.2f} s per step, peak "
              f"{'GPU' if gpu else 'host anonymous'} memory {peak / GIB:.2f} GiB ({fits})",
              flush=True)
        shape = tuple(round(side * GROWTH) for side in shape)
    if largest is not None:
        print(f"largest volume that fitted, {tiling(tile_z)}: {'×'.join(map(str, largest))} "
              f"({math.prod(largest) / 1e6:.1f} M voxels)", flush=True)
    keras.backend.clear_session()


def host_memory_row(precision: str, tile_z: int, shape: tuple[int, int, int], width: int,
                    steps: int) -> tuple[float, int]:
    """(seconds of the last step, peak host anonymous bytes) of `steps` CPU classifier steps."""
    import keras

    import kdsb  # noqa: F401  (registers kdsb's Keras objects)

    keras.mixed_precision.set_global_policy(precision)
    return classifier_step(classifier(width, tile_z), shape, steps, gpu=False)


def host_memory(shapes: list[tuple[int, int, int]], width: int, tiles: list[int],
                precisions: list[str], steps: int) -> None:
    """Peak host anonymous memory of CPU classifier steps: a row per precision, tiling and
    shape, each in a fresh process."""
    for precision in precisions:
        for tile_z in tiles:
            for shape in shapes:
                with concurrent.futures.ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn")
                ) as pool:
                    seconds, peak = pool.submit(
                        host_memory_row, precision, tile_z, shape, width, steps
                    ).result()
                print(f"| {precision} | {tile_z or 'whole'} | {'×'.join(map(str, shape))} | "
                      f"{math.prod(shape) / 1e6:.2f} | {peak / GIB:.2f} | {seconds:.1f} |",
                      flush=True)


def parse_shape(text: str) -> tuple[int, int, int]:
    sides = tuple(int(side) for side in text.lower().split("x"))
    if len(sides) != 3:
        raise argparse.ArgumentTypeError(f"expected ZxYxX, received {text!r}")
    return sides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on any machine")
    parser.add_argument("--host-memory", type=parse_shape, nargs="+", metavar="ZxYxX",
                        help="measure the CPU classifier step's peak host memory at these shapes")
    parser.add_argument("--width", type=int, default=64, help="with --host-memory")
    parser.add_argument("--tile-z", type=int, nargs="+", default=[0, 32], metavar="VOXELS",
                        help="with --host-memory: z-slabs of the first block, 0: whole volume")
    parser.add_argument("--precision", nargs="+", default=["float32", "mixed_bfloat16"],
                        choices=["float32", "mixed_bfloat16"], help="with --host-memory")
    parser.add_argument("--steps", type=int, default=2, help="with --host-memory")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import kdsb  # noqa: F401  (registers kdsb's Keras objects)

    try:
        if args.host_memory:
            print(f"| precision | tile z | volume | M voxels | peak host anon GiB | step s |\n"
                  f"|---|---:|---|---:|---:|---:|  (width {args.width}, CPU, load average "
                  f"{Path('/proc/loadavg').read_text().split()[:3]})", flush=True)
            host_memory(args.host_memory, args.width, args.tile_z, args.precision, args.steps)
            return 0
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        gpu = gpus[0] if gpus and not args.smoke else None
        if gpu is None:
            reason = "--smoke" if args.smoke else "no GPU found"
            print(f"{reason}: running the tiny CPU smoke version of the GPU check")
            sizes = SMOKE
        else:
            details = tf.config.experimental.get_device_details(gpu)
            print(f"GPU: {details.get('device_name', gpu.name)}, compute capability "
                  f"{details.get('compute_capability')}; TensorFlow {tf.__version__}")
            sizes = Sizes()
        precision = mixed_precision_for(gpu)
        gmcae_speed(sizes, precision, gpu is not None)
        for tile_z in (0, sizes.tile_z):
            classifier_memory(sizes, precision, gpu is not None, tile_z)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
