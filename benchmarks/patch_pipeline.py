#!/usr/bin/env python
"""GMCAE input pipeline alone: patches per second streamed from HDF5 against the patch cache.

Phantom chests (96×128×128 at 1 mm, as benchmarks/train_gmcae.py writes them) in a temporary
folder; for each cohort size: the streaming pipeline (`patch_dataset`: HDF5 reads, lung
sampling, a symmetry per patch) and the cached one (`build_patch_cache` once, timed apart, then
`cached_patch_dataset`: memory-mapped float16 shards, one symmetry per batch), iterated for
about `--seconds` each after warm-up, same run. Resident anonymous memory (RssAnon, without the
file-backed pages of the memory-mapped shards) after each cached measurement shows whether
memory grows with the cohort.

Usage: python benchmarks/patch_pipeline.py [--cohorts 8,64] [--batch-size 16] [--seconds 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_gmcae import time_pipeline, write_phantoms  # noqa: E402


def anonymous_mb() -> float:
    """Resident anonymous memory of this process (RssAnon), MB: what a pipeline holds itself.
    Pages of the memory-mapped shards are file-backed page cache (RssFile), which the system
    reclaims under pressure, so they are left out."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="8,64")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-volume", type=int, default=256, help="cached patches per volume")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    from kdsb.data.datasets import patch_dataset
    from kdsb.data.patch_cache import build_patch_cache, cached_patch_dataset

    print(f"{'volumes':>8}{'streamed p/s':>14}{'cached p/s':>12}{'ratio':>8}"
          f"{'cache build s':>15}{'anon MB':>9}")
    with tempfile.TemporaryDirectory() as temp:
        for count in (int(c) for c in args.cohorts.split(",")):
            folder = Path(temp) / f"c{count}"
            paths = write_phantoms(folder, count, seed=0)
            streamed = time_pipeline(patch_dataset(paths, batch_size=args.batch_size, seed=0),
                                     args.seconds, args.warmup)
            started = time.perf_counter()
            shards = build_patch_cache(paths, folder / ".patch_cache",
                                       per_volume=args.per_volume)
            build_s = time.perf_counter() - started
            cached = time_pipeline(cached_patch_dataset(shards, batch_size=args.batch_size),
                                   args.seconds, args.warmup)
            print(f"{count:>8}{streamed:>14.0f}{cached:>12.0f}{cached / streamed:>7.1f}×"
                  f"{build_s:>15.1f}{anonymous_mb():>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
