"""`kdsb demo WORKDIR`: synth → preprocess → train-gmcae → train-classifier → predict → evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "the whole pipeline on phantom cohorts, on a CPU, in minutes (held-out test scores)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workdir", type=Path, help="folder for cohorts, volumes, runs and plots")
    parser.add_argument("--patients", type=int, default=None,
                        help="training cohort size (default 64, 6 with --fast; the test "
                             "cohort 32, 4 with --fast, or half of --patients, at least 2)")
    seeds = parser.add_mutually_exclusive_group()
    # No default here: argparse takes a value equal to the default for none given, and would
    # let `--seed 0 --seeds 1 2` through (found in review).
    seeds.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                       help="run the demo once per seed (WORKDIR/seed_<s>) and report the test "
                            "scores' mean ± sd (seeds.csv)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    parser.add_argument("--fast", action="store_true",
                        help="tiny budgets: checks every stage runs, not that it learns")


def run(args: argparse.Namespace) -> int:
    from kdsb.demo import run_demo, run_demo_seeds

    if args.seeds:
        run_demo_seeds(args.workdir, args.seeds, patients=args.patients, fast=args.fast,
                       workers=args.workers)
    else:
        run_demo(args.workdir, patients=args.patients, seed=args.seed or 0, fast=args.fast,
                 workers=args.workers)
    return 0
