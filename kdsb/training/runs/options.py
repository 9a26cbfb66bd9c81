"""A run's options: the `RunOptions` dataclass every model subclasses (the single source of
its options, defaults and help), its command-line flags and the resume rule (config.json)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kdsb.errors import UsageError
from kdsb.io.atomic import read_json
from kdsb.io.run_layout import OPTIONS_NAME
from kdsb.training.runs.devices import PRECISIONS, STRATEGIES
from kdsb.training.runs.folder import check_run_dir

logger = logging.getLogger(__name__)



RUN_KIND_KEY = "run_kind"  # config.json: which kind of run wrote it (`RunOptions.RUN_KIND`)
MAX_SEED = 2**31

# Options a resumed run may change (they change neither the model nor its inputs); every other
# option given again must keep its saved value. `gmcae` is the classifier's GMCAE file, which may
# have moved: the run checks that its content is the one it began with (classifier.json).
RESUMABLE_CHANGES = (
    "epochs", "steps_per_epoch", "patience", "min_epochs", "distribute", "keep_checkpoints",
    "tile_z", "gmcae"
)
RESUMABLE_NOTES = {"gmcae": " (moved: the same file's content)"}


def resumable_flags(options: type[RunOptions]) -> str:
    """The flags of `options` a resumed run may change, comma-separated (`RESUMABLE_CHANGES`,
    with their `RESUMABLE_NOTES`): the one list `--resume`'s help and refusal both print."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    return ", ".join(flag_of(fields[k]) + RESUMABLE_NOTES.get(k, "")
                     for k in RESUMABLE_CHANGES if k in fields)


def option(default: Any = dataclasses.MISSING, help: str = "", **argparse_kwargs: Any) -> Any:
    """A field of a `RunOptions` subclass and its command-line flag.

    Args:
        default: the default value (none: a required option).
        help: the flag's help; "(default: …)" is appended.
        **argparse_kwargs: more `add_argument` arguments (`type`, `choices`, `action`, `flag`
            for another flag name, `shown` for the default as shown in the help, `path` to
            compare values as file paths on resume).
    """
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


OptionsT = TypeVar("OptionsT", bound="RunOptions")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options every model's training has; subclasses add theirs and may change defaults.

    Attributes:
        epochs: total epochs of the run (not the number still to do).
        batch_size: examples per weight update.
        lr: Adam learning rate.
        val_fraction: fraction of patients held out for validation.
        seed: seed of the split, the data streams and the weight initialisation.
        precision: one of `PRECISIONS` (see `configure_runtime`).
        distribute: one of `STRATEGIES` (see `distribution_strategy`).
        keep_checkpoints: newest epoch checkpoints kept on disk (None: all).
        patience: early stopping after this many epochs without a better monitored value
            (None: never).
        min_epochs: early stopping ends no run before this many epochs (0: it may from the
            first).
    """

    epochs: int = option(20, "total epochs of the run", type=int)
    batch_size: int = option(1, "examples per weight update", type=int)
    lr: float = option(1e-3, "Adam learning rate", type=float)
    val_fraction: float = option(0.2, "fraction of patients held out for validation", type=float)
    seed: int = option(0, "random seed (split, data order and augmentation, weights)", type=int)
    precision: str = option(
        "float32", "layer precision (mixed_* compute in 16 bits, losses in float32)",
        choices=PRECISIONS,
    )
    distribute: str = option(
        "none", "none; mirrored: data parallel over every GPU (or logical CPU) of this machine; "
        "multiworker: data parallel over the processes that TF_CONFIG lists, one per machine "
        "(start the same command on each; RUN_DIR on a shared filesystem)",
        choices=STRATEGIES,
    )
    keep_checkpoints: int | None = option(
        None, "newest epoch checkpoints kept on disk (and the best epoch's)", type=int,
        shown="all"
    )
    patience: int | None = option(
        None, "early stopping: epochs without a better validation loss", type=int, shown="never"
    )
    min_epochs: int = option(
        0, "early stopping ends no run before this many epochs (a model that learns late is "
        "not stopped on its early plateau); 0: from the first", type=int
    )

    RUN_KIND: ClassVar[str] = "training"  # what config.json calls the run (`RUN_KIND_KEY`)

    def __post_init__(self) -> None:
        # A file option is kept, and saved, absolute: a run resumed from another working folder
        # reads the same file (found in review: a relative --gmcae was refused as missing).
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("path") and isinstance(value, (str, os.PathLike)):
                object.__setattr__(self, field.name, os.path.abspath(value))
        # No option has a meaning at infinity (found in review: --variance-floor inf passed
        # its check and failed deep in Keras): every number must be finite, whatever its check.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise UsageError(f"expected a finite {flag_of(field)}, received {value!r}")
        for ok, expected, received in self.checks():
            if not ok:
                raise UsageError(f"expected {expected}, received {received!r}")

    def checks(self) -> list[tuple[bool, str, Any]]:
        """(valid, what is expected, value) for every option; subclasses extend the list."""
        return [
            (self.epochs >= 1, "--epochs >= 1", self.epochs),
            (self.batch_size >= 1, "--batch-size >= 1", self.batch_size),
            (self.lr > 0, "--lr > 0", self.lr),
            (0.0 < self.val_fraction < 1.0, "--val-fraction in (0, 1)", self.val_fraction),
            (self.precision in PRECISIONS, f"--precision in {PRECISIONS}", self.precision),
            (self.distribute in STRATEGIES, f"--distribute in {STRATEGIES}", self.distribute),
            (self.keep_checkpoints is None or self.keep_checkpoints >= 1,
             "--keep-checkpoints >= 1", self.keep_checkpoints),
            (self.patience is None or self.patience >= 1, "--patience >= 1", self.patience),
            (self.min_epochs >= 0, "--min-epochs >= 0", self.min_epochs),
            # Room for the offsets added to it (restarts, folds, workers, epochs), under the
            # 2**32 NumPy and Keras take (found in review: a traceback, some after an attempt).
            (0 <= self.seed < MAX_SEED, f"--seed in [0, {MAX_SEED})", self.seed),
        ]

    def to_saved(self) -> dict[str, Any]:
        """The options as written to config.json (lists for tuples)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def kind_of_saved(cls, saved: Mapping[str, Any]) -> str:
        """The kind of run a config.json records (`RUN_KIND_KEY`); one written before kdsb
        recorded it is taken for this kind, unless a subclass tells another's options apart."""
        return saved.get(RUN_KIND_KEY, cls.RUN_KIND)

    @classmethod
    def from_saved(cls: type[OptionsT], saved: Mapping[str, Any]) -> OptionsT:
        """Options from a config.json; keys that are no option (`data_dir`) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def add_options(parser: argparse.ArgumentParser, options: type[RunOptions]) -> None:
    """Add a flag for every field of `options`, its default and help read from the field.

    Flags left out are absent from the parsed namespace (`argparse.SUPPRESS`), so a resumed run
    tells "not given" (keep the saved value) from "given" (check that it may change); see
    `given_options`.
    """
    for field in dataclasses.fields(options):
        kwargs = {k: v for k, v in field.metadata.items() if k not in ("flag", "shown", "path")}
        help_text = kwargs.pop("help")
        if field.default is dataclasses.MISSING:  # checked by `resolve_options`: not resuming
            help_text = f"{help_text} (required; resuming, the saved one)"
        elif kwargs.get("action") not in ("store_true", "store_false"):
            shown = field.metadata.get("shown", field.default)
            if isinstance(shown, tuple):
                shown = " ".join(str(v) for v in shown)
            help_text = f"{help_text} (default: {shown})"
        kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(flag_of(field), dest=field.name, help=help_text, **kwargs)


def given_options(args: argparse.Namespace, options: type[RunOptions]) -> dict[str, Any]:
    """The options given on the command line (those `add_options` added and the user passed)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(options)
            if hasattr(args, f.name)}


def _switch(field: dataclasses.Field, value: bool) -> str:
    """How the command line gives an on/off option `value`: its flag, or "no FLAG" (found by a
    user's trial: a refused resume said "expected --allow-unlabelled False")."""
    flag, action = flag_of(field), field.metadata.get("action")
    if action is argparse.BooleanOptionalAction:
        return flag if value else f"--no-{flag[2:]}"
    if action in ("store_true", "store_false"):
        return flag if value == (action == "store_true") else f"no {flag}"
    return f"{flag} {value}"  # an on/off option given a value


def _same(field: dataclasses.Field, old: Any, new: Any) -> bool:
    if field.metadata.get("path"):
        return os.path.realpath(str(old)) == os.path.realpath(str(new))
    return old == new


def resolve_options(
    options: type[OptionsT],
    given: Mapping[str, Any] | OptionsT,
    run_dir: str | os.PathLike,
    *,
    resume: bool,
    data_dir: str | os.PathLike,
) -> tuple[OptionsT, int]:
    """The run's options and the number of epochs already done; writes nothing.

    Args:
        options: the model's `RunOptions` subclass.
        given: the options given now (a mapping of some fields, or a whole options object).
        run_dir: the run folder.
        resume: continue the run in `run_dir` from its newest checkpoint.
        data_dir: the training data, compared with the saved one (a warning when it moved).

    Returns:
        Starting afresh, the options given. Resuming, the saved options (config.json) with the
        given ones applied, and the epoch of the newest checkpoint (0 without one).

    Raises:
        UsageError: an option is out of range; a required option is missing (not resuming);
            `run_dir` holds checkpoints but `resume` is off;
            resuming, `run_dir` holds no config.json (no run was begun there), or a given
            option differs from its saved value and is not among `RESUMABLE_CHANGES`.
        KdsbError: config.json is not valid JSON.
    """
    if isinstance(given, RunOptions):
        given = dataclasses.asdict(given)
    last = check_run_dir(run_dir, resume)
    path = Path(run_dir) / OPTIONS_NAME
    if resume and not path.is_file():
        # A mistyped RUN_DIR would otherwise start hours of training with default options.
        state = "a folder without" if Path(run_dir).is_dir() else "a missing folder, so no"
        fix = ("leave out --resume to begin one" if last is None else
               f"its checkpoints stay: restore {OPTIONS_NAME}, or use a new RUN_DIR")
        raise UsageError(f"expected --resume in the RUN_DIR of a run begun there, received "
                         f"{state} {OPTIONS_NAME}: {run_dir} ({fix})")
    if not resume:
        missing = [flag_of(f) for f in dataclasses.fields(options)
                   if f.default is dataclasses.MISSING and f.name not in given]
        if missing:
            raise UsageError(f"expected {', '.join(missing)} (required unless --resume), "
                             f"received none")
        return options(**given), 0
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise UsageError(f"expected the options of a {options.RUN_KIND} run in {path}, "
                         f"received {type(stored).__name__}")
    kind = options.kind_of_saved(stored)
    if kind != options.RUN_KIND:  # found in review: a traceback, or a run clobbered
        raise UsageError(f"expected --resume in the RUN_DIR of a {options.RUN_KIND} run, "
                         f"received {run_dir}, which {path.name} says is a {kind} run")
    # The changes that may be made are made before the saved options are checked: a GMCAE
    # moved since is given at its new place, and the old one need not exist (found in review).
    try:
        saved = options.from_saved({**stored, **{key: value for key, value in given.items()
                                                 if key in RESUMABLE_CHANGES}})
    except TypeError as error:  # a required option missing: a damaged record
        raise UsageError(f"expected the options of a {options.RUN_KIND} run in {path}, "
                         f"received {error}") from None
    resolved = dataclasses.replace(saved, **given)
    fields = {f.name: f for f in dataclasses.fields(options)}
    for key in given:
        old, new = getattr(saved, key), getattr(resolved, key)
        if key not in RESUMABLE_CHANGES and not _same(fields[key], old, new):
            if isinstance(old, bool):  # an on/off flag: its spelling, not Python's True/False
                saved_text, given_text = _switch(fields[key], old), _switch(fields[key], new)
            else:
                saved_text, given_text = f"{flag_of(fields[key])} {old}", str(new)
            raise UsageError(
                f"expected {saved_text} as saved in {path} when resuming, "
                f"received {given_text}; only {resumable_flags(options)} may change"
            )
    data_dir = str(Path(data_dir).resolve())
    if stored.get("data_dir", data_dir) != data_dir:
        logger.warning("resuming with data from %s (the run began with %s)",
                       data_dir, stored["data_dir"])
    return resolved, last[0] if last else 0
