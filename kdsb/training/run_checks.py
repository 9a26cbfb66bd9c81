"""Checks of a classifier run's options against each other and against the run it resumes:
options a head ignores, restarts a distributed run cannot make, a GMCAE learned on another
grid, and what a resumed run may not change (its accumulation, its folds' training, the way
its volumes are read, its GMCAE)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kdsb.data.inputs import INPUT_NAME, VolumeInput
from kdsb.errors import UsageError
from kdsb.io.atomic import read_json
from kdsb.training import attempts, runs
from kdsb.training.classifier_options import ClassifierOptions

logger = logging.getLogger(__name__)

# The heads that read an option only some heads read (the others ignore it).
READ_BY_HEADS = {"levels": ("spp",), "pooling": ("spp",), "freeze_blocks": ("spp",),
                 "log_pooled": ("spp",),
                 "mil_pooling": ("mil", "nll"), "mil_block": ("mil",),
                 "bag_symmetries": ("mil", "nll")}


def warn_of_other_heads_options(given: Any, head: str) -> None:
    """Warn of options given on the command line that `head` does not read (`--levels` with
    `--head mil`); the library path (a whole options object) names none."""
    if not isinstance(given, dict):
        return
    ignored = [key for key, heads in READ_BY_HEADS.items() if key in given and head not in heads]
    if ignored:
        logger.warning("--head %s ignores %s", head,
                       ", ".join("--" + key.replace("_", "-") for key in ignored))


def warn_of_unused_options(given: Any, options: ClassifierOptions) -> None:
    """Warn of options given on the command line that other options leave unused: `--restarts`
    with `--distribute multiworker` (which never restarts), `--class-weight` with `--loss focal`
    (bce only), `--bag-symmetries` above 1 with
    `--no-augment` (training and validation read the identity's bag only; found in review),
    `--outside-hu` or `--lung-dilation-mm` with `--no-mask-outside-lungs` (nothing is masked)."""
    if not isinstance(given, dict):
        return
    if given.get("restarts") and not attempts.restarts_apply(options):
        logger.warning("--restarts %d is not used with --distribute %s: a stuck model is kept",
                       options.restarts, options.distribute)
    if "class_weight" in given and options.loss != "bce":
        logger.warning("--class-weight %s is not used with --loss %s (bce only)",
                       options.class_weight, options.loss)
    if given.get("bag_symmetries", 1) > 1 and not options.augment \
            and options.head in READ_BY_HEADS["bag_symmetries"]:
        logger.warning("--bag-symmetries %d is not used with --no-augment: every bag is read "
                       "under the identity only", options.bag_symmetries)
    masking = [f"--{key.replace('_', '-')}" for key in ("outside_hu", "lung_dilation_mm")
               if key in given]
    if masking and not options.mask_outside_lungs:
        logger.warning("%s not used with --no-mask-outside-lungs: nothing outside the lungs is "
                       "masked", " and ".join(masking) + (" is" if len(masking) == 1 else " are"))


def check_accumulation_unchanged(run_dir: Path, options: ClassifierOptions) -> None:
    """Refuse a resumed SPP run of `--batch-size` > 1 whose `--distribute` changed: its
    checkpoints' optimizer accumulates gradients over the batch without a strategy and not
    under one (`spp.compile_classifier`), so the resumed epochs would update otherwise than the
    run's first ones (found in review).

    Raises:
        UsageError: naming both settings.
    """
    saved = read_json(run_dir / runs.OPTIONS_NAME).get("distribute", "none")
    if options.head == "spp" and options.batch_size > 1 and saved != options.distribute:
        raise UsageError(
            f"expected --distribute {saved} when resuming {run_dir} (--head spp, --batch-size "
            f"{options.batch_size}: its checkpoints' optimizer "
            f"{'accumulates' if saved == 'none' else 'does not accumulate'} gradients over the "
            f"batch), received --distribute {options.distribute}")


def warn_of_another_gmcae_spacing(gmcae: str, volume_input: VolumeInput) -> None:
    """Warn when the GMCAE learned its features on another grid than the one the classifier's
    encoder is fed (the volumes' spacing times `--downscale`): it then sees every structure at
    another scale in voxels."""
    from kdsb.data.inputs import gmcae_spacing_of
    from kdsb.io.series import same_spacing

    learned = gmcae_spacing_of(gmcae)
    fed = tuple(s * volume_input.downscale for s in volume_input.spacing_mm)
    if learned is not None and not same_spacing(learned, fed):
        logger.warning("GMCAE %s learned on volumes of %s mm spacing, the classifier's encoder "
                       "is fed %s mm (volumes of %s mm, --downscale %d): its features see "
                       "every structure at another scale", gmcae, tuple(learned), fed,
                       tuple(volume_input.spacing_mm), volume_input.downscale)


def check_fold_training_unchanged(run_dir: Path, options: ClassifierOptions) -> None:
    """Folds already finished were trained with the epochs, patience and min_epochs in
    config.json (as the run last saved it): the remaining folds must be too, or the ensemble
    and its metrics.json would mix trainings.

    Raises:
        UsageError: --epochs, --patience or --min-epochs differs from config.json.
    """
    try:
        saved = json.loads((run_dir / runs.OPTIONS_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return  # resolve_options has said what it could of a missing or broken config.json
    for key in ("epochs", "patience", "min_epochs"):
        if key in saved and saved[key] != getattr(options, key):
            flag = key.replace("_", "-")
            raise UsageError(f"expected --{flag} {saved[key]} as the finished folds of {run_dir} "
                             f"were trained, received {getattr(options, key)}: a "
                             "cross-validated run's folds share their training")


def check_input_unchanged(run_dir: Path, volume_input: VolumeInput, gmcae: str | os.PathLike,
                          gmcae_sha256: str) -> None:
    """Refuse to resume a run whose models read their volumes otherwise than this run would
    (the volumes preprocessed again at another spacing: its finished models would then be
    declared to read the new grid), or whose GMCAE file `gmcae` has other content than the run
    began with (it may have moved; a record without the GMCAE's digest, of an earlier version,
    is not checked for content, and then the GMCAE may not move)."""
    path = run_dir / INPUT_NAME
    if not path.is_file():
        # Killed before it was written (or a run of an earlier version): no digest, so the
        # GMCAE may not move (found in review: any --gmcae then slipped through).
        began_with = read_json(run_dir / runs.OPTIONS_NAME).get("gmcae", gmcae)
        if os.path.realpath(str(began_with)) != os.path.realpath(str(gmcae)):
            raise UsageError(
                f"expected --resume with the GMCAE the run began with, {began_with}, received "
                f"{gmcae}: the run has no {INPUT_NAME} with its digest to tell a moved file "
                f"from another one")
        return
    saved = read_json(path)
    before = VolumeInput.from_config(saved, str(path))
    if before != volume_input:
        changed = {key: (value, volume_input.to_config()[key])
                   for key, value in before.to_config().items()
                   if value != volume_input.to_config()[key]}
        raise UsageError(
            "expected --resume on volumes read as the run began, received "
            + "; ".join(f"{key} {old} then, {new} now" for key, (old, new) in changed.items())
            + f" ({path}): preprocess as before or start a new RUN_DIR"
        )
    if saved.get("gmcae_sha256") not in (None, gmcae_sha256):
        raise UsageError(
            f"expected --resume with the GMCAE the run began with ({saved.get('gmcae')}), "
            f"received {gmcae}, whose content differs ({path}): start a new RUN_DIR"
        )
    moved = os.path.realpath(str(saved.get("gmcae", gmcae))) != os.path.realpath(str(gmcae))
    if moved and saved.get("gmcae_sha256") is None:
        raise UsageError(
            f"expected --resume with the GMCAE the run began with, {saved.get('gmcae')}, "
            f"received {gmcae}: this run's record ({path}) has no digest to tell a moved file "
            f"from another one"
        )


