#!/usr/bin/env python
"""Preprocessing speed: kdsb's per-patient pipeline against the classic DSB 2017 tutorial.

A 512×512 phantom chest CT (`kdsb.phantoms.anatomy.make_phantom`, 0.7 mm pixels) is written as a
DICOM series to a temporary folder. Each method then runs as a whole separate Python process
(imports included), DICOM folder → lung mask at 1 mm, and reports its own peak RSS:

- baseline: the well-known DSB 2017 tutorial approach, written out below: slices read with
  pydicom and sorted by ImagePositionPatient[2], HU by slope and intercept, cubic
  `scipy.ndimage.zoom` of the whole volume to 1 mm, a -320 HU threshold, background removed by
  labelling from the corner voxel, per-slice largest air component filling, largest component;
- kdsb: `kdsb.preprocessing.pipeline.preprocess_patient` (read, segment on the source grid, crop,
  resample the crop, write the HDF5 file), one patient on every core as `kdsb preprocess
  --workers 1` runs it (threads in the distance transforms, block means and compression);
- kdsb, 1 thread: the same on one thread, as each worker of a cohort runs when there are as
  many workers as cores (`kdsb preprocess`'s default on up to 4 cores). Its CPU seconds are
  a cohort's throughput against the single-threaded baseline, start-up included; the
  threaded run's wall time is that of one scan on an idle machine;
- each of baseline and kdsb on one thread, run twice in one process with the second scan timed
  alone: what a cohort's worker spends on each scan after its first (`kdsb preprocess` keeps
  its workers for the whole run, so imports and first touches of memory are paid once per
  worker, not per scan). The baseline gets the same treatment, so the ratio compares the two
  programs' work per scan;
- `kdsb preprocess` itself (default workers) on a cohort of copies of the scan: its wall and
  CPU seconds (every process, start-up included) divided by the scans, the cohort's measure
  taken whole; against it, one baseline process a core side by side, their second scans
  started together (a barrier) and timed to the last one's end: both methods with every core
  busy (two workers slow each other: shared cache and memory), compared in scans a minute, the
  median of the repeats (the cohort's CPU is the machine's busy time: compare it on a quiet
  machine).

Dice of each mask against the phantom's truth is measured on the method's own output grid.
Then the cohort runner (`python -m kdsb preprocess`) runs on a small phantom cohort with 1 and
with 2 workers. Finally kdsb alone runs on a 512×512×600 scan to check its peak memory.

Usage: python benchmarks/preprocess.py [--slices 200] [--slice-mm 1.5] [--seed 0] [--repeats 3]
       [--cohort 4] [--cohort-scans 24] [--skip-large] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_MM = 1.0
PIXEL_MM = 0.7
SIZE = 512
TUTORIAL_THRESHOLD_HU = -320
TUTORIAL_PADDING_RAW = -2000
LARGE_SLICES = 600
COHORT_SIZE = 256
LARGE_SLICE_MM = 0.5
KDSB_THREADS = {"kdsb": None, "kdsb-1": 1}  # method → threads (None: every usable core)
PROFILED = ("read_series", "segment_lungs_in_box", "lung_bounding_box", "resample_volume",
            "resample_mask", "write_volume")


# --- The DSB 2017 tutorial approach (baseline), kept close to the original code. ---------------

def tutorial_load_scan(folder: Path) -> list:
    import pydicom

    slices = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    slices.sort(key=lambda s: float(s.ImagePositionPatient[2]))
    thickness = abs(slices[0].ImagePositionPatient[2] - slices[1].ImagePositionPatient[2])
    for s in slices:
        s.SliceThickness = thickness
    return slices


def tutorial_get_pixels_hu(slices: list) -> np.ndarray:
    image = np.stack([s.pixel_array for s in slices]).astype(np.int16)
    image[image == TUTORIAL_PADDING_RAW] = 0
    for n, s in enumerate(slices):
        intercept, slope = s.RescaleIntercept, s.RescaleSlope
        if slope != 1:
            image[n] = (slope * image[n].astype(np.float64)).astype(np.int16)
        image[n] += np.int16(intercept)
    return image


def tutorial_resample(image: np.ndarray, scan: list) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    spacing = np.array([float(scan[0].SliceThickness), *map(float, scan[0].PixelSpacing)])
    new_shape = np.round(image.shape * spacing / TARGET_MM)
    real_resize_factor = new_shape / image.shape
    old_shape = np.array(image.shape)
    image = ndimage.zoom(image, real_resize_factor, mode="nearest")  # order 3: cubic spline
    # zoom maps the first and last voxel centres onto each other: the spacing that really results
    # (the tutorial reported spacing / real_resize_factor, slightly off).
    return image, spacing * (old_shape - 1) / (np.array(image.shape) - 1)


def tutorial_largest_label_volume(labels: np.ndarray, bg: int = -1):
    values, counts = np.unique(labels, return_counts=True)
    counts = counts[values != bg]
    values = values[values != bg]
    return values[np.argmax(counts)] if len(counts) > 0 else None


def tutorial_segment_lung_mask(image: np.ndarray, fill_lung_structures: bool = True) -> np.ndarray:
    from skimage import measure

    binary_image = np.array(image > TUTORIAL_THRESHOLD_HU, dtype=np.int8) + 1
    labels = measure.label(binary_image)
    background_label = labels[0, 0, 0]
    binary_image[background_label == labels] = 2
    if fill_lung_structures:
        for i, axial_slice in enumerate(binary_image):
            axial_slice = axial_slice - 1
            labeling = measure.label(axial_slice)
            l_max = tutorial_largest_label_volume(labeling, bg=0)
            if l_max is not None:
                binary_image[i][labeling != l_max] = 1
    binary_image -= 1
    binary_image = 1 - binary_image
    labels = measure.label(binary_image, background=0)
    l_max = tutorial_largest_label_volume(labels, bg=0)
    if l_max is not None:
        binary_image[labels != l_max] = 0
    return binary_image.astype(np.uint8)


def run_baseline(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask, spacing (z, y, x) and origin (z, y, x) in mm of the tutorial pipeline."""
    scan = tutorial_load_scan(folder)
    image = tutorial_get_pixels_hu(scan)
    origin = np.array([float(scan[0].ImagePositionPatient[i]) for i in (2, 1, 0)])
    image, spacing = tutorial_resample(image, scan)
    return tutorial_segment_lung_mask(image), spacing, origin


# --- Child processes --------------------------------------------------------------------------

def run_kdsb(folder: Path, work: Path, profile: bool, threads: int | None) -> None:
    """kdsb's pipeline on `threads` threads (None: every usable core)."""
    from kdsb.preprocessing.pipeline import preprocess_patient, usable_cores

    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    preprocess_patient(folder, work, patient_id="bench", spacing=(TARGET_MM,) * 3,
                       threads=threads or usable_cores())
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler)
        for (_, _, name), (_, _, _, cumulative, _) in stats.stats.items():
            if name in PROFILED:
                print(f"  profile {name:<18} {cumulative:7.2f} s", file=sys.stderr)


def read_kdsb_output(work: Path):
    """Mask, spacing (z, y, x) and origin (z, y, x) in mm of the HDF5 file kdsb wrote."""
    from kdsb.io import volumes

    volume = volumes.read_volume(volumes.volume_path(work, "bench"))
    return volume.lung_mask, np.array(volume.spacing), np.array(volume.origin)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    VmHWM (Linux) starts afresh at exec; ru_maxrss would also count the parent's memory at the
    fork that started this process (the parent holds the phantom), so it is only the fallback.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(method: str, folder: Path, result: Path, profile: bool) -> None:
    """Run one method in this process and save its mask, geometry, seconds and peak RSS.

    A method named `<name>-warm` runs `<name>` twice and times the second scan alone, as a
    cohort's worker process runs every scan after its first: imports paid, memory touched.
    The kdsb run reads its HDF5 file back for the Dice measurement after its time, CPU and peak
    memory are taken, so that read counts in none of them (the baseline writes no file)."""
    name, warm = method.removesuffix("-warm"), method.endswith("-warm")

    def run(profiled: bool) -> tuple | None:
        if name == "baseline":
            return run_baseline(folder)
        run_kdsb(folder, result.parent, profiled, KDSB_THREADS[name])
        return None

    if warm:
        run(profiled=False)
        wait_at_barrier()
    cpu_before = time.process_time() if warm else 0.0
    started_at = time.time()  # side by side runs line their timed scans up by it
    started = time.perf_counter()
    outcome = run(profile)
    seconds = time.perf_counter() - started
    finished = time.time()  # the parent measures start-up + work up to here (not saving below)
    # Every thread of this process since it started (imports too), or over the warm scan alone.
    cpu = time.process_time() - cpu_before
    peak_mb = peak_rss_mb()
    mask, spacing, origin = outcome or read_kdsb_output(result.parent)
    np.savez(result, mask=mask, spacing=spacing, origin=origin)
    result.with_suffix(".json").write_text(json.dumps(
        {"seconds": seconds, "cpu": cpu, "peak_mb": peak_mb, "finished": finished,
         "started_at": started_at}
    ))


BARRIER_ENV = "KDSB_BENCH_BARRIER"  # "FOLDER:COUNT": side-by-side processes start together


def wait_at_barrier() -> None:
    """With `BARRIER_ENV` set, mark this process ready in its folder and wait until all
    `COUNT` are: side-by-side processes then start their timed scans together, so a span
    counts no process's first (untimed) scan (found in review: the stagger of their first
    scans lengthened the span)."""
    spec = os.environ.get(BARRIER_ENV)
    if not spec:
        return
    folder, count = spec.rsplit(":", 1)
    (Path(folder) / f"ready-{os.getpid()}").touch()
    while len(list(Path(folder).glob("ready-*"))) < int(count):
        time.sleep(0.005)


def in_process(method: str, folder: Path, work: Path, profile: bool = False) -> dict:
    """Run a method as a whole separate process: its wall time from process start to the end of
    the pipeline (imports included), time inside the pipeline, peak RSS and mask."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / f"{method}.npz"
    command = [sys.executable, __file__, "--child", method, str(folder), str(result)]
    if profile:
        command.append("--profile")
    started = time.time()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(result.with_suffix(".json").read_text())
    report["wall"] = report["finished"] - started
    with np.load(result) as arrays:
        report.update({key: arrays[key] for key in arrays.files})
    return report


# --- Measurements -------------------------------------------------------------------------------

def cpu_model() -> str:
    """The processor's name as Linux reports it: the ratio depends on it (the baseline took 11.4 s
    on an AVX-512 Xeon and 17–19 s on an AVX2 EPYC, kdsb about 1.5 s on both)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "processor unknown"


def dice_against_truth(report: dict, truth) -> float:
    """Dice of a method's mask and the truth sampled (nearest voxel) on the method's grid."""
    index = []
    valid = []
    for axis in range(3):
        coordinate = report["origin"][axis] + report["spacing"][axis] * np.arange(
            report["mask"].shape[axis]
        )
        i = np.rint((coordinate - truth.origin[axis]) / truth.spacing[axis]).astype(int)
        valid.append((i >= 0) & (i < truth.lung_mask.shape[axis]))
        index.append(np.clip(i, 0, truth.lung_mask.shape[axis] - 1))
    expected = truth.lung_mask[np.ix_(*index)].astype(bool)
    expected &= valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    mask = report["mask"].astype(bool)
    # Truth voxels outside the method's output (cropped away) count as missed.
    truth_voxels = truth.lung_mask.sum() * np.prod(truth.spacing) / np.prod(report["spacing"])
    return 2.0 * np.count_nonzero(mask & expected) / (np.count_nonzero(mask) + truth_voxels)


def write_phantom(folder: Path, slices: int, slice_mm: float, seed: int):
    from kdsb.phantoms.anatomy import make_phantom
    from kdsb.phantoms.dicom_write import write_ct_series

    phantom = make_phantom(
        np.random.default_rng(seed), size=SIZE, cancer=True, fov_mm=SIZE * PIXEL_MM,
        slice_mm=slice_mm, z_extent_mm=slices * slice_mm,
    )
    write_ct_series(
        folder, phantom.hu, phantom.spacing, phantom.origin, patient_id=folder.name,
        padding_mask=np.broadcast_to(phantom.padding_mask, phantom.hu.shape),
    )
    return phantom


def cohort_speedup(work: Path, patients: int, seed: int) -> tuple[float, float]:
    from kdsb.phantoms.cohort import write_cohort
    from kdsb.phantoms.layout import dicom_dir

    write_cohort(work / "cohort", patients=patients, seed=seed, size=COHORT_SIZE)
    seconds = []
    for workers in (1, 2):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "kdsb", "-q", "preprocess", str(dicom_dir(work / "cohort")),
             str(work / f"out{workers}"), "--workers", str(workers)],
            check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has spent so far (Linux `/proc/stat`): the
    cohort's workers are children of multiprocessing's fork server, whose CPU time never
    reaches this process's `RUSAGE_CHILDREN`, so the run's CPU is the machine's busy time over
    it (a quiet machine's; the load average printed says how quiet)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def side_by_side(method: str, folder: Path, work: Path, count: int) -> float:
    """Run `count` processes of `method` at once (a cohort's load on `count` cores), their
    timed scans started together (`wait_at_barrier`): the span in seconds from that start to
    the last one's end, during which the `count` processes did one scan each (the mean of their
    own times would count the last ones' scans on a machine the first ones had left)."""
    command = [sys.executable, __file__, "--child", method, str(folder)]
    results = [work / f"{method}-{index}" / f"{method}.npz" for index in range(count)]
    barrier = work / f"{method}-barrier"
    shutil.rmtree(barrier, ignore_errors=True)
    barrier.mkdir(parents=True)
    processes = []
    for result in results:
        result.parent.mkdir(parents=True, exist_ok=True)
        processes.append(subprocess.Popen(
            [*command, str(result)], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), BARRIER_ENV: f"{barrier}:{count}"}))
    for process in processes:
        if process.wait():
            raise subprocess.CalledProcessError(process.returncode, command)
    reports = [json.loads(result.with_suffix(".json").read_text()) for result in results]
    return max(r["finished"] for r in reports) - min(r["started_at"] for r in reports)


def cohort_throughput(work: Path, folder: Path, scans: int, run: int) -> dict:
    """`kdsb preprocess` (default workers) on a cohort of `scans` copies of the scan in `folder`
    (hard links, one patient folder each, made on the first `run`): wall and CPU seconds (the
    machine's, start-up included) per scan, and the first patient's mask and geometry."""
    cohort = work / "throughput" / "dicom"
    for index in range(scans if run == 0 else 0):
        patient = cohort / f"copy_{index:03d}"
        patient.mkdir(parents=True)
        for file in folder.iterdir():
            os.link(file, patient / file.name)
    out = work / "throughput" / f"volumes_{run}"
    before = machine_busy_seconds()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdsb", "-q", "preprocess", str(cohort), str(out)],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    cpu = machine_busy_seconds() - before
    from kdsb.io import volumes

    volume = volumes.read_volume(volumes.volume_path(out, "copy_000"))
    return {"seconds": seconds / scans, "cpu": cpu / scans, "mask": volume.lung_mask,
            "spacing": np.array(volume.spacing), "origin": np.array(volume.origin)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--slices", type=int, default=200, help="slices of the 512×512 phantom")
    parser.add_argument("--slice-mm", type=float, default=1.5, help="slice spacing, mm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cohort", type=int, default=4, help="patients for the workers test")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (best)")
    parser.add_argument("--cohort-scans", type=int, default=24,
                        help="copies of the scan preprocessed as one cohort (0: skip)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 600-slice run")
    parser.add_argument("--profile", action="store_true", help="time kdsb's stages (cProfile)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "FOLDER", "RESULT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, folder, result = args.child
        child(method, Path(folder), Path(result), args.profile)
        return 0

    with tempfile.TemporaryDirectory(prefix="kdsb-bench-") as temp:
        work = Path(temp)
        folder = work / "dicom" / "bench"
        phantom = write_phantom(folder, args.slices, args.slice_mm, args.seed)
        shape = "×".join(map(str, phantom.hu.shape))
        print(f"phantom {shape} voxels, spacing {phantom.spacing} mm (z, y, x)", flush=True)
        # Alternating runs, best of `repeats`: the machine is shared, so the minimum is the
        # figure least disturbed by other processes.
        runs = {"kdsb": [], "kdsb-1": [], "baseline": [], "kdsb-1-warm": [], "baseline-warm": []}
        for _ in range(args.repeats):
            for method, reports in runs.items():
                reports.append(in_process(method, folder, work / method, args.profile))
        kdsb, kdsb_1, baseline = (min(runs[m], key=lambda r: r["wall"])
                                  for m in ("kdsb", "kdsb-1", "baseline"))
        kdsb_warm, baseline_warm = (min(runs[m], key=lambda r: r["cpu"])
                                    for m in ("kdsb-1-warm", "baseline-warm"))
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs ({cpu_model()}); "
              f"best of {args.repeats} runs each by wall time (CPU s counts all of a "
              f"process's threads)", flush=True)
        rows = [
            ("baseline (DSB 2017 tutorial)", baseline),
            ("kdsb preprocess_patient", kdsb),
            ("kdsb, 1 thread (a fresh process)", kdsb_1),
        ]
        print(f"\n| method, {shape} | process s | compute s | vs baseline | CPU s | "
              "vs baseline, CPU | Dice | peak MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, report in rows:
            print(
                f"| {name} | {report['wall']:.1f} | {report['seconds']:.1f} | "
                f"{baseline['wall'] / report['wall']:.1f}× | {report['cpu']:.1f} | "
                f"{baseline['cpu'] / report['cpu']:.1f}× | "
                f"{dice_against_truth(report, phantom):.3f} | {report['peak_mb']:.0f} |"
            )
        print(f"\nA cohort's worker after its first scan (one process runs the method twice, on "
              f"one thread; the second scan timed, best of {args.repeats} by CPU):\n")
        print("| method, second scan of a process | s | CPU s | vs baseline, CPU | Dice |")
        print("| --- | ---: | ---: | ---: | ---: |")
        rows = [("baseline (DSB 2017 tutorial)", baseline_warm), ("kdsb, 1 thread", kdsb_warm)]
        cohort = crowded = None
        from kdsb.commands.preprocess import DEFAULT_MAX_WORKERS
        from kdsb.preprocessing.pipeline import usable_cores

        cores = min(DEFAULT_MAX_WORKERS, usable_cores())  # `kdsb preprocess`'s default workers
        if args.cohort_scans:
            # Both methods with every core busy, the median of `repeats` (the cohort's single
            # runs vary more than the best of single scans): kdsb's cohort (start-up included),
            # and one baseline process a core side by side (their second scans).
            cohorts, spans = [], []
            for run in range(args.repeats):
                cohorts.append(cohort_throughput(work, folder, args.cohort_scans, run))
                spans.append(side_by_side("baseline-warm", folder, work / "crowded", cores))
            # Medians alike for both (found in review: the lower middle run for kdsb, the mean
            # of the middle two for the baseline, with an even --repeats).
            cohort = {key: float(np.median([c[key] for c in cohorts]))
                      for key in ("seconds", "cpu")}
            cohort.update({key: value for key, value in cohorts[0].items()
                           if key not in cohort})  # the mask and geometry, for the Dice
            crowded = float(np.median(spans))
            rows.append((f"`kdsb preprocess`, {args.cohort_scans} copies as a cohort (a scan's "
                         f"share of the run, every core; median of {args.repeats})", cohort))
        for name, report in rows:
            print(f"| {name} | {report['seconds']:.1f} | {report['cpu']:.2f} | "
                  f"{baseline_warm['cpu'] / report['cpu']:.1f}× | "
                  + (f"{dice_against_truth(report, phantom):.3f} |" if "mask" in report else "|"))
        if cohort is not None:
            baseline_rate, kdsb_rate = 60 * cores / crowded, 60 / cohort["seconds"]
            print(f"\nscans a minute with all {cores} cores busy (medians of {args.repeats}): "
                  f"kdsb's cohort {kdsb_rate:.1f}, runs of "
                  + ", ".join(f"{c['seconds'] * args.cohort_scans:.1f}" for c in cohorts)
                  + f" s; the baseline, {cores} processes side by side (a second scan each, "
                  f"spans of {', '.join(f'{s:.1f}' for s in spans)} s), {baseline_rate:.1f}: "
                  f"**{kdsb_rate / baseline_rate:.1f}×**; load average now "
                  f"{os.getloadavg()[0]:.1f}")
        del phantom, kdsb, kdsb_1, baseline, kdsb_warm, baseline_warm, cohort

        if not args.skip_large:
            large = work / "dicom" / "large"
            write_phantom(large, LARGE_SLICES, LARGE_SLICE_MM, args.seed)
            report = in_process("kdsb", large, work / "large", args.profile)
            print(f"| kdsb, 512×512×{LARGE_SLICES} | {report['wall']:.1f} | "
                  f"{report['seconds']:.1f} | | {report['cpu']:.1f} | | | "
                  f"{report['peak_mb']:.0f} |")

        if args.cohort:
            one, two = cohort_speedup(work, args.cohort, args.seed)
            print(f"\ncohort of {args.cohort} phantoms ({COHORT_SIZE}×{COHORT_SIZE}): "
                  f"`kdsb preprocess` 1 worker {one:.1f} s, 2 workers {two:.1f} s, "
                  f"speed-up {one / two:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
