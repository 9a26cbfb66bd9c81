#!/usr/bin/env python
"""Cluster preprocessing: `kdsb preprocess --scheduler` on Dask against the local process pool.

One phantom cohort (`kdsb synth`, written once into WORKDIR) is preprocessed alternately by
the local pool (`--workers N`) and by a Dask `LocalCluster` of N single-threaded worker
processes (`--scheduler`, `kdsb.preprocessing.cluster`), each run into a fresh folder, best of
`--repeats`. The cluster is started before its runs and its start-up timed apart (on a real
cluster it is up already). Every patient's volume file must be the same either way: HU, lung
mask and geometry are compared.

Usage: python benchmarks/cluster_preprocess.py WORKDIR [--patients 16] [--size 256]
       [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdsb.io.volumes import list_volumes, read_volume  # noqa: E402
from kdsb.phantoms.cohort import write_cohort  # noqa: E402
from kdsb.phantoms.layout import dicom_dir, labels_path  # noqa: E402
from kdsb.preprocessing.cohort import run_cohort  # noqa: E402


def timed_run(dicom: Path, out: Path, workers: int, scheduler: str | None) -> float:
    """Wall seconds of one whole cohort run into a fresh `out`; every patient must succeed."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if run_cohort(dicom, out, workers=workers, spacing=(1.0,), scheduler=scheduler) != 0:
        raise SystemExit(f"expected every patient to preprocess, see {out / 'manifest.csv'}")
    return time.perf_counter() - start


def differences(a: Path, b: Path) -> list[str]:
    """Patients whose volume files differ between two output folders (HU, mask, geometry)."""
    left, right = list_volumes(a), list_volumes(b)
    if sorted(left) != sorted(right):
        return sorted(set(left) ^ set(right))
    differ = []
    for pid in sorted(left):
        x, y = read_volume(left[pid]), read_volume(right[pid])
        same = (np.array_equal(x.hu, y.hu) and np.array_equal(x.lung_mask, y.lung_mask)
                and np.allclose(x.spacing, y.spacing) and np.allclose(x.origin, y.origin))
        if not same:
            differ.append(pid)
    return differ


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import distributed

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines per worker

    cohort = args.workdir / f"cohort_{args.patients}_{args.size}"
    if not labels_path(cohort).is_file():
        write_cohort(cohort, patients=args.patients, seed=0, size=args.size, overwrite=True)
    dicom = dicom_dir(cohort)
    start = time.perf_counter()
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        startup = time.perf_counter() - start
        times: dict[str, list[float]] = {"local pool": [], "Dask": []}
        for _ in range(args.repeats):
            times["local pool"].append(timed_run(dicom, args.workdir / "local", args.workers,
                                                 None))
            times["Dask"].append(timed_run(dicom, args.workdir / "dask", args.workers,
                                           cluster.scheduler_address))
    differ = differences(args.workdir / "local", args.workdir / "dask")
    best = {name: min(values) for name, values in times.items()}
    print(f"\n{args.patients} phantoms {args.size}×{args.size}, {args.workers} workers, best of "
          f"{args.repeats}; Dask LocalCluster start-up {startup:.1f} s (not in the runs)")
    print(f"{'method':<12} {'wall s':>8} {'patients/min':>13} {'vs local':>9}")
    for name, seconds in best.items():
        print(f"{name:<12} {seconds:>8.1f} {60 * args.patients / seconds:>13.1f} "
              f"{best['local pool'] / seconds:>8.2f}×")
    print("volume files identical (HU, lung mask, geometry): "
          + ("yes, every patient" if not differ else f"NO: {differ}"))
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
