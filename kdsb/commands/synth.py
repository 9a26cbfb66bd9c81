"""`kdsb synth OUT_ROOT --patients N --seed S`: a phantom cohort, or real anatomy with implants.

Without `--base` every patient is a phantom chest (`kdsb.phantoms.anatomy`). With `--base SCAN`
every patient is that real scan, varied, with lesions implanted (`kdsb.phantoms.implants`): the
test data for a lung mask or a classifier on anatomy nobody designed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdsb.demo import PHANTOM_SCALE as DEMO_SCALE
from kdsb.phantoms.layout import dicom_dir, truth_dir

HELP = "write a test cohort as DICOM series plus labels.csv and ground truth"
# Kept here (not imported) so that `kdsb --help` stays instant; tests check they agree.
LESION_KINDS = ("solid", "spiculated", "part_solid", "ground_glass", "small_solid")
LESION_PLACES = ("intrapulmonary", "paravertebral", "lateral", "anterior", "paramediastinal",
                 "diaphragmatic", "apical")
PHANTOM_SIZE, PHANTOM_SCALE = 128, 1.0
RADIUS_MM = (8.0, 35.0)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_root", type=Path, help="folder to create: dicom/<id>/, labels.csv")
    parser.add_argument("--patients", type=int, default=8, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=None,
                        help=f"phantoms: axial image side in pixels (default {PHANTOM_SIZE})")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="phantoms: physical size of each patient relative to an adult chest "
             f"(the demo's: {DEMO_SCALE:g}; default {PHANTOM_SCALE:g})",
    )
    parser.add_argument("--base", type=Path,
                        help="a real chest CT (DICOM folder, or NIfTI / MetaImage / NRRD file): "
                             "every patient is this scan, varied, with lesions implanted")
    parser.add_argument("--kinds", type=_names, default=None,
                        help="with --base: comma-separated kinds of the cancer lesion, among "
                             + ", ".join(LESION_KINDS) + " (default: all but small_solid)")
    parser.add_argument("--places", type=_names, default=None,
                        help="with --base: comma-separated places of the lesions, among "
                             + ", ".join(LESION_PLACES) + " (default: all)")
    parser.add_argument("--radius-mm", type=float, nargs=2, default=None,
                        metavar=("LOW", "HIGH"),
                        help=f"with --base: radius of the cancer lesion, {RADIUS_MM[0]:g} to "
                             f"{RADIUS_MM[1]:g} mm (default {RADIUS_MM[0]:g} {RADIUS_MM[1]:g})")
    parser.add_argument("--id-prefix", default=None, metavar="PREFIX",
                        help="patient ids PREFIX_000, PREFIX_001, … (default phantom, or implant "
                             "with --base; letters, digits, '.', '_' and '-'): another prefix "
                             "keeps a held-out cohort's ids apart from a training cohort's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cohort")


def run(args: argparse.Namespace) -> int:
    from kdsb.errors import UsageError
    from kdsb.io.paths import require_output_dir

    require_output_dir(args.out_root, "OUT_ROOT, a folder for the cohort")

    # Options of the other kind of cohort would be silently ignored: refused instead.
    wrong = ("--size", "--scale") if args.base is not None else ("--kinds", "--places",
                                                                 "--radius-mm")
    given = [flag for flag in wrong if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        kind, scope = (("an implant cohort (--base)", "phantoms only") if args.base is not None
                       else ("a phantom cohort", "with --base only"))
        raise UsageError(f"expected no {' '.join(given)} for {kind}, received "
                         f"{' '.join(given)} ({scope})")
    if args.base is not None:
        from kdsb.phantoms.implants import write_implant_cohort

        labels_csv = write_implant_cohort(
            args.out_root,
            args.base,
            patients=args.patients,
            seed=args.seed,
            kinds=args.kinds if args.kinds is not None else list(LESION_KINDS[:-1]),
            places=args.places if args.places is not None else list(LESION_PLACES),
            radius_mm=tuple(args.radius_mm) if args.radius_mm is not None else RADIUS_MM,
            overwrite=args.overwrite,
            **({} if args.id_prefix is None else {"id_prefix": args.id_prefix}),
        )
    else:
        from kdsb.phantoms.cohort import write_cohort

        labels_csv = write_cohort(
            args.out_root,
            patients=args.patients,
            seed=args.seed,
            size=PHANTOM_SIZE if args.size is None else args.size,
            scale=PHANTOM_SCALE if args.scale is None else args.scale,
            overwrite=args.overwrite,
            **({} if args.id_prefix is None else {"id_prefix": args.id_prefix}),
        )
    root = labels_csv.parent
    print(f"DICOM series: {dicom_dir(root)}")
    print(f"labels:       {labels_csv}")
    print(f"ground truth: {truth_dir(root)}")
    return 0
