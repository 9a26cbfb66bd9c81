#!/usr/bin/env python
"""GMCAE input pipeline alone: patches per second streamed from HDF5 against the patch cache,
and whether memory stays flat from 8 to 1,600 volumes.

A few phantom chests (96×128×128 at 1 mm, as benchmarks/train_gmcae.py writes them; `--templates`)
are generated once; a cohort of N volumes is N distinct volume files copied from them (file i
from template i mod T; the cache samples each file with its own seed, so the patches differ).
For each cohort size, same run: the streaming pipeline (`patch_dataset`: HDF5 reads, lung
sampling, a symmetry per patch) and the cached one (`build_patch_cache` once, timed apart, then
`cached_patch_dataset`: memory-mapped float16 shards, one symmetry per batch), iterated for
about `--seconds` each after warm-up. A thread samples the process's resident anonymous memory
(RssAnon: what the pipeline holds itself, without the file-backed pages of the memory-mapped
shards and HDF5 files, which the system reclaims) every 20 ms; the table gives its peak during
the cache build and during the cached iteration. Each cohort's files are deleted after it.

Disk: a cohort needs N × (1.7 MB volume + per-volume × 64 KiB of shard); 1,600 volumes at
`--per-volume 64` take ~9.5 GB.

Usage: python benchmarks/patch_pipeline.py [--cohorts 8,64,1600] [--per-volume 64]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_gmcae import time_pipeline, write_phantoms  # noqa: E402

SAMPLE_SECONDS = 0.02


def status_mb(field: str) -> float:
    """One memory field of /proc/self/status ("RssAnon", "RssFile", ...), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonymousPeak:
    """Peak RssAnon (MB) while the `with` block runs, sampled by a thread every 20 ms."""

    def __enter__(self):
        self.peak = status_mb("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, status_mb("RssAnon"))


def copy_cohort(templates: list[Path], folder: Path, count: int) -> list[Path]:
    """`count` distinct volume files in `folder`, file i a copy of template i mod T."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"vol{i:05d}.h5"
        shutil.copyfile(templates[i % len(templates)], path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="8,64,1600")
    parser.add_argument("--templates", type=int, default=8, help="distinct phantoms generated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-volume", type=int, default=64, help="cached patches per volume")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary files")
    args = parser.parse_args(argv)

    from kdsb.data.datasets import patch_dataset
    from kdsb.data.patch_cache import build_patch_cache, cached_patch_dataset
    from kdsb.io.volumes import read_attrs

    print(f"batch {args.batch_size}, {args.per_volume} cached patches per volume, "
          f"{args.templates} templates; load average before "
          f"{Path('/proc/loadavg').read_text().split()[:3]}")
    print("| volumes | streamed patches/s | cached patches/s | ratio | cache build s "
          "| build s per volume | peak anon MB, build | peak anon MB, cached | cache GB |")
    print("|---:" * 9 + "|", flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as temp:
        templates = write_phantoms(Path(temp) / "templates", args.templates, seed=0)
        for count in (int(c) for c in args.cohorts.split(",")):
            folder = Path(temp) / f"c{count}"
            paths = copy_cohort(templates, folder, count)
            streamed = time_pipeline(patch_dataset(paths, batch_size=args.batch_size, seed=0),
                                     args.seconds, args.warmup)
            started = time.perf_counter()
            with AnonymousPeak() as build_memory:
                shards = build_patch_cache(paths, folder / ".patch_cache",
                                           per_volume=args.per_volume)
            build_s = time.perf_counter() - started
            with AnonymousPeak() as cached_memory:
                cached = time_pipeline(
                    cached_patch_dataset(shards, batch_size=args.batch_size,
                                         spacing=read_attrs(paths[0])["spacing"]),
                    args.seconds, args.warmup)
            cache_gb = sum(s.stat().st_size for s in shards) / 1e9
            print(f"| {count} | {streamed:.0f} | {cached:.0f} | {cached / streamed:.1f}× "
                  f"| {build_s:.1f} | {build_s / count:.3f} | {build_memory.peak:.0f} "
                  f"| {cached_memory.peak:.0f} | {cache_gb:.2f} |", flush=True)
            shutil.rmtree(folder)
    print(f"load average after {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
