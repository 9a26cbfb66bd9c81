"""The training spine of every kdsb model: options, run folder, seeds, precision, devices,
checkpoints, resume, NaN guard, history and TensorBoard.

A model's training module (`kdsb.training.gmcae`, `kdsb.training.classifier`) brings only its
data, its model and its metrics, and a `RunOptions` subclass: the single source of its options,
their defaults and help (`add_options` builds the command-line flags from the fields). A run
goes `resolve_options` → (check the data) → `begin` → (build the datasets) → `train`, which
writes one run folder:

```
RUN_DIR/
  config.json                      the run's options (`OPTIONS_NAME`), reused by --resume
  checkpoints/epoch_0001.keras …   full model + optimizer state after every epoch (atomic)
  <best_name>                      the best model so far by `monitor` (atomic)
  history.csv                      one row per epoch (keras CSVLogger; `epoch` counts from 0)
  logs/                            TensorBoard event files (when tensorboard is installed)
```

With `--distribute multiworker` (`distribution_strategy`) several processes, one per machine,
train one model together; only the chief (`Worker.chief`) writes the run folder, the others
write their callbacks' files into a temporary folder of their own that `fit` removes.

Resuming keeps the saved options; options given again must keep their saved value, except
`RESUMABLE_CHANGES`, which change neither the model nor its inputs.

`fit(..., resume=True)` loads the newest checkpoint (model and optimizer state, safe mode) and
continues at the next epoch, so a run killed at any moment loses at most one epoch. Training
that produces a NaN or infinite loss stops at once with a `TrainingError` naming the epoch and
batch; the checkpoint of a non-finite model is never written.

TensorFlow is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kdsb.errors import KdsbError, TrainingError, UsageError
from kdsb.io.atomic import atomic_path, remove_stale_temporaries, write_json

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("none", "mirrored", "multiworker")
# The environment variable that describes a multi-worker cluster and this process's place in it.
TF_CONFIG = "TF_CONFIG"
TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
    '"index": 0}}'
)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{4,})\.keras$")
HISTORY_NAME = "history.csv"
TENSORBOARD_DIR = "logs"
# Monitored quantities whose larger values are better ("auto" mode); everything else is a loss.
HIGHER_IS_BETTER = ("acc", "accuracy", "auc", "precision", "recall")
NAN_ADVICE = "try a lower --lr, a lower --clipnorm or a larger variance floor"
OPTIONS_NAME = "config.json"
# Options a resumed run may change (they change neither the model nor its inputs); every other
# option given again must keep its saved value.
RESUMABLE_CHANGES = (
    "epochs", "steps_per_epoch", "patience", "distribute", "keep_checkpoints", "tile_z"
)


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
        None, "newest epoch checkpoints kept on disk", type=int, shown="all"
    )
    patience: int | None = option(
        None, "early stopping: epochs without a better validation loss", type=int, shown="never"
    )

    def __post_init__(self) -> None:
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
        ]

    def to_saved(self) -> dict[str, Any]:
        """The options as written to config.json (lists for tuples)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_saved(cls: type[OptionsT], saved: Mapping[str, Any]) -> OptionsT:
        """Options from a config.json; keys that are no option (`data_dir`) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})


def _flag(field: dataclasses.Field) -> str:
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
        if field.default is dataclasses.MISSING:
            kwargs["required"] = True
        elif kwargs.get("action") not in ("store_true", "store_false"):
            shown = field.metadata.get("shown", field.default)
            if isinstance(shown, tuple):
                shown = " ".join(str(v) for v in shown)
            help_text = f"{help_text} (default: {shown})"
        kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(_flag(field), dest=field.name, help=help_text, **kwargs)


def given_options(args: argparse.Namespace, options: type[RunOptions]) -> dict[str, Any]:
    """The options given on the command line (those `add_options` added and the user passed)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(options)
            if hasattr(args, f.name)}


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
        UsageError: an option is out of range; `run_dir` holds checkpoints but `resume` is off;
            resuming, a given option differs from its saved value and is not among
            `RESUMABLE_CHANGES`.
        KdsbError: config.json is not valid JSON.
    """
    if isinstance(given, RunOptions):
        given = dataclasses.asdict(given)
    last = check_run_dir(run_dir, resume)
    path = Path(run_dir) / OPTIONS_NAME
    if not (resume and path.is_file()):
        return options(**given), 0
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise KdsbError(f"{path}: expected JSON, received invalid text ({error})") from None
    saved = options.from_saved(stored)
    resolved = dataclasses.replace(saved, **given)
    fields = {f.name: f for f in dataclasses.fields(options)}
    for key in given:
        old, new = getattr(saved, key), getattr(resolved, key)
        if key not in RESUMABLE_CHANGES and not _same(fields[key], old, new):
            changeable = ", ".join(_flag(fields[k]) for k in RESUMABLE_CHANGES if k in fields)
            raise UsageError(
                f"expected {_flag(fields[key])} {old} as saved in {path} when resuming, "
                f"received {new}; only {changeable} may change"
            )
    data_dir = str(Path(data_dir).resolve())
    if stored.get("data_dir", data_dir) != data_dir:
        logger.warning("resuming with data from %s (the run began with %s)",
                       data_dir, stored["data_dir"])
    return resolved, last[0] if last else 0


def begin(run_dir: str | os.PathLike, options: RunOptions, *, data_dir: str | os.PathLike,
          seed: int | None = None) -> None:
    """Create the distribution strategy, write the run's options (config.json, with `data_dir`;
    the chief only), then seed (`seed`, else `options.seed`) and set the precision.

    Call it once the data is checked, before building datasets or models and before any other
    TensorFlow op: a multi-worker strategy must start TensorFlow's collective ops first.
    """
    distribution_strategy(options.distribute)
    if worker(options.distribute).chief:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / OPTIONS_NAME,
                   {**options.to_saved(), "data_dir": str(Path(data_dir).resolve())})
    configure_runtime(seed=options.seed if seed is None else seed, precision=options.precision)


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's place among the training processes.

    Attributes:
        index: 0 for the chief, 1 … count - 1 for the others.
        count: training processes (1 unless `--distribute multiworker`).
    """

    index: int = 0
    count: int = 1

    @property
    def chief(self) -> bool:
        """The process that writes the run folder."""
        return self.index == 0

    def seed(self, seed: int) -> int:
        """A seed of this worker's own data stream (`seed` itself for the chief), so workers
        draw different patches and augmentations and a run still repeats."""
        return int(seed) + self.index * WORKER_SEED_STRIDE


# Workers' data seeds lie this far apart: beyond any epoch offset a resumed run adds.
WORKER_SEED_STRIDE = 1_000_000_007


def read_tf_config(environ: Mapping[str, str] | None = None) -> Worker:
    """This process's `Worker` from the TF_CONFIG environment variable.

    TF_CONFIG is JSON: `cluster` maps "worker" (and optionally "chief") to lists of
    "host:port"; `task` names this process: type "worker" or "chief", and its index in that
    list. The chief is task "chief", or worker 0 when the cluster has no chief; the workers
    follow it in order.

    Raises:
        UsageError: TF_CONFIG is missing, not JSON, or not of that form.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG)
    if not text:
        raise UsageError(
            f"expected the {TF_CONFIG} environment variable with --distribute multiworker "
            f"(e.g. {TF_CONFIG_EXAMPLE}), received none"
        )
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        kind, index = task["type"], task["index"]
        if (len(chiefs) > 1 or kind not in ("chief", "worker") or not isinstance(index, int)
                or not 0 <= index < len(chiefs if kind == "chief" else workers)):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(
            f"expected {TF_CONFIG} as JSON like {TF_CONFIG_EXAMPLE} (task type worker or chief, "
            f"index within its list), received {text!r}"
        ) from None
    return Worker(index=index if kind == "chief" else len(chiefs) + index,
                  count=len(chiefs) + len(workers))


def worker(distribute: str) -> Worker:
    """This process's `Worker` under strategy `distribute` (the only one unless multiworker)."""
    return read_tf_config() if distribute == "multiworker" else Worker()


def wait_for_workers(distribute: str) -> None:
    """Under multiworker, block until every worker calls it too (a collective barrier).

    Commands call it last: a worker that exits while the chief still writes its reports makes
    TensorFlow abort the chief's collective ops.
    """
    if distribute != "multiworker":
        return
    import tensorflow as tf

    strategy = distribution_strategy(distribute)

    @tf.function
    def barrier():
        return strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    barrier()


def keras_verbosity(distribute: str = "none") -> int:
    """`verbose` of `keras.Model.fit`: silent under `kdsb -q` and on workers other than the
    chief, a progress bar on a terminal, one line per epoch otherwise."""
    if not logger.isEnabledFor(logging.INFO) or not worker(distribute).chief:
        return 0
    return 1 if sys.stdout.isatty() else 2


def train(
    build_model: Callable[[], Any],
    train_data: Any,
    val_data: Any,
    run_dir: str | os.PathLike,
    options: RunOptions,
    *,
    resume: bool,
    best_name: str,
    steps_per_epoch: int,
    validation_steps: int | None = None,
    monitor: str = "val_loss",
    prepare_model: Callable[[Any], Any] | None = None,
    give_up_below: tuple[str, float] | None = None,
) -> Any:
    """`fit` with a run's options: epochs, patience, checkpoints kept, distribution strategy
    (`give_up_below` as in `fit`).

    Under multiworker, `train_data` is this worker's own stream (its share of the data, batches
    of its share of the global batch) and `val_data` the whole validation set, which every
    worker evaluates (the metrics then equal one worker's); `steps_per_epoch` counts this
    worker's batches.

    Returns:
        The `keras.callbacks.History` of the epochs run now.
    """
    return fit(
        build_model,
        train_data,
        val_data,
        run_dir,
        epochs=options.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        resume=resume,
        best_name=best_name,
        monitor=monitor,
        early_stopping_patience=options.patience,
        give_up_below=give_up_below,
        keep_checkpoints=options.keep_checkpoints,
        strategy=distribution_strategy(options.distribute),
        verbose=keras_verbosity(options.distribute),
        prepare_model=prepare_model,
    )


def configure_runtime(*, seed: int, precision: str = "float32") -> None:
    """Seed every random generator, make TensorFlow's ops deterministic and choose the numeric
    precision of the layers.

    Call it once, before building models or datasets. With the same seed, options, data,
    machine and software a run then repeats bit for bit: weights, history, predictions (kdsb's
    tf.data pipelines draw their randomness from `seed` and keep their order).

    Op determinism (`tf.config.experimental.enable_op_determinism`) makes kernels that may sum
    in a varying order (mostly on GPUs) use deterministic algorithms, and forces every tf.data
    map and interleave to keep its order. It is a switch of the whole process, not of one run:
    TensorFlow has no public call to turn it off, and calling it again is harmless. While it is
    on, TensorFlow random ops need a seed (set here), `tf.timestamp` raises, an op without a
    deterministic implementation raises `UnimplementedError`, and some GPU kernels are slower.

    Args:
        seed: seeds Python's `random`, NumPy and TensorFlow (`keras.utils.set_random_seed`,
            which also resets TensorFlow's op-seed counter and Keras's global seed generator).
        precision: "float32"; "mixed_bfloat16" (bf16 compute, float32 weights: CPUs with
            AVX512-BF16/AMX and recent GPUs); or "mixed_float16" (fp16 compute, float32 weights:
            GPUs; Keras then scales the loss against underflow). Losses that must stay exact
            cast to float32 themselves.

    Raises:
        UsageError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise UsageError(
            f"expected a precision among {', '.join(PRECISIONS)}, received {precision!r}"
        )
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(precision)
    logger.debug("seed %d, op determinism on, precision policy %s", seed, precision)


def distribution_strategy(name: str = "none") -> Any:
    """A `tf.distribute` strategy by name.

    Args:
        name: "none": the default strategy (one device; TensorFlow still uses every CPU core).
            "mirrored": `tf.distribute.MirroredStrategy` with data parallelism over every GPU of
            this machine, or, without GPUs, over every logical CPU device (tests split the CPU
            into two with `tf.config.set_logical_device_configuration` before TensorFlow
            initialises). Each batch is split between the devices; gradients are summed.
            "multiworker": `tf.distribute.MultiWorkerMirroredStrategy` over the processes that
            TF_CONFIG lists (`read_tf_config`), each with its devices; gradients are
            all-reduced every step. Created once per process, before any other TensorFlow op.

    Returns:
        The strategy; build and compile models inside `strategy.scope()` (`fit` does).

    Raises:
        UsageError: an unknown name; multiworker without a valid TF_CONFIG.
    """
    if name not in STRATEGIES:
        raise UsageError(f"expected a strategy among {', '.join(STRATEGIES)}, received {name!r}")
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        return _multiworker_strategy(read_tf_config())
    return _mirrored_strategy()


# One strategy of each kind per process: `begin` creates it, `train` and `fit` reuse it.
@functools.cache
def _mirrored_strategy() -> Any:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    if len(devices) < 2:
        logger.warning("mirrored strategy over one device (%s): no speed-up to expect", devices[0])
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    logger.info("mirrored strategy over %d devices: %s", len(devices), ", ".join(devices))
    return strategy


@functools.cache
def _multiworker_strategy(this: Worker) -> Any:
    import tensorflow as tf

    class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """MultiWorkerMirroredStrategy with the two reductions Keras 3's `fit` asks of it.

        Keras (3.15, `keras.src.backend.tensorflow.trainer`) reduces a whole (x, y) batch
        before the first step, only to learn its shapes, and every step's scalar logs with
        `axis=0`; TensorFlow's strategy reduces neither (a nested value is unsupported, a
        scalar has no axis 0). Here the batch is this worker's own (shapes suffice, and
        volumes of different sizes could not be reduced), and a scalar is averaged over the
        workers, so every worker sees the same logs (the NaN guard fires on all at once).
        """

        def reduce(self, reduce_op, value, axis=None):
            if tf.nest.is_nested(value):
                return tf.nest.map_structure(lambda v: self.experimental_local_results(v)[0],
                                             value)
            if axis == 0 and all(v.shape.rank == 0 for v in self.experimental_local_results(value)):
                axis = None
            return super().reduce(reduce_op, value, axis)

    strategy = KerasMultiWorkerStrategy()
    logger.info("multi-worker strategy: worker %d of %d%s, %d replicas in all", this.index,
                this.count, " (chief)" if this.chief else "", strategy.num_replicas_in_sync)
    return strategy


def _distribute(strategy: Any, data: Any) -> Any:
    """Under multiworker, a worker's own dataset as the distributed input of `fit` (no
    auto-sharding: the training modules shard by worker themselves)."""
    import tensorflow as tf

    if data is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return data
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = data.with_options(options)
    return strategy.distribute_datasets_from_function(lambda _: data)


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """The checkpoint written after `epoch` (counted from 1) in `run_dir`."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch_{epoch:04d}.keras"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run as (epoch counted from 1, path), oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name))
    )


def last_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint of a run as (epoch counted from 1, path), or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def discard_training(run_dir: str | os.PathLike, history_as: str, models: tuple[str, ...]) -> None:
    """Clear a run folder for a fresh start: its checkpoints, TensorBoard logs and the `models`
    it saved are removed, its history.csv is renamed `history_as` (kept as a record); config.json
    and other files stay."""
    run_dir = Path(run_dir)
    for folder in (CHECKPOINT_DIR, TENSORBOARD_DIR):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    for name in models:
        (run_dir / name).unlink(missing_ok=True)
    history = run_dir / HISTORY_NAME
    if history.is_file():
        history.replace(run_dir / history_as)


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> tuple[int, Path] | None:
    """Refuse to start afresh over a run's checkpoints; returns the newest one (or None).

    `resolve_options` calls it before anything is written into `run_dir`, `fit` again before
    training.

    Raises:
        UsageError: `run_dir` already holds checkpoints but `resume` is False.
    """
    last = last_checkpoint(run_dir)
    if last is not None and not resume:
        raise UsageError(
            f"expected an empty run folder or --resume, received {run_dir} which already holds "
            f"checkpoints up to epoch {last[0]}"
        )
    return last


def save_model_atomically(model: Any, path: str | os.PathLike) -> Path:
    """Save a Keras model to `path` (.keras) through a hidden temporary file and a rename.

    A reader, or a run resumed after a kill, sees either the previous file or the new one,
    never a half-written archive.
    """
    with atomic_path(path) as temp:
        model.save(temp)
    return Path(path)


def _remove_stale_temporaries(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        if folder.is_dir():
            remove_stale_temporaries(folder)


def read_history(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a history.csv written by `fit` (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _truncate_history(path: Path, epochs_done: int, write: bool = True) -> list[dict[str, str]]:
    """Keep the rows of epochs already checkpointed (a kill may have logged one more); rewrite
    the file without the others when `write`."""
    rows = read_history(path)
    kept = [row for row in rows if row["epoch"].isdigit() and int(row["epoch"]) < epochs_done]
    if write and len(kept) != len(rows):
        logger.info("dropping %d history row(s) not covered by a checkpoint", len(rows) - len(kept))
        with atomic_path(path) as temp, temp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(kept)
    return kept


def _higher_is_better(monitor: str) -> bool:
    name = monitor.removeprefix("val_")
    return any(name == key or name.endswith(f"_{key}") for key in HIGHER_IS_BETTER)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number (a string, an array): nothing to check


def _callback_classes():
    """The kdsb callbacks; defined lazily because they subclass a Keras class."""
    import keras

    class NonFiniteGuard(keras.callbacks.Callback):
        """Raise `TrainingError` at the first batch or epoch whose logs hold a NaN or an Inf.

        Placed first among the callbacks, so no checkpoint, best model or history row of a
        non-finite model is written after it fires. Checking every batch reads the loss back
        from the device each step; that costs little next to a 3D convolution step, and it
        stops a diverged run at once instead of an epoch later.
        """

        def __init__(self, run_dir: Path):
            super().__init__()
            self.run_dir = run_dir
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def _check(self, logs, where: str) -> None:
            bad = sorted(k for k, v in (logs or {}).items() if not _finite(v))
            if not bad:
                return
            last = last_checkpoint(self.run_dir)
            good = f"{last[1]} (epoch {last[0]})" if last else "none (no epoch completed)"
            raise TrainingError(
                f"training stopped: {bad[0]} became NaN or infinite at epoch {self.epoch + 1} "
                f"{where}; last good checkpoint: {good}; {NAN_ADVICE}"
            )

        def on_train_batch_end(self, batch, logs=None):
            self._check(logs, f"batch {batch + 1}")

        def on_epoch_end(self, epoch, logs=None):
            self._check(logs, "(validation)")

    class EpochCheckpoint(keras.callbacks.Callback):
        """After every epoch: save `checkpoints/epoch_NNNN.keras` and, when better, the best model.

        Both writes are atomic. `keep` bounds how many epoch checkpoints stay on disk (the
        newest ones; None keeps all). `best` is the best monitored value of earlier epochs, so a
        resumed run only replaces the best model with a better one.
        """

        def __init__(
            self,
            run_dir: Path,
            best_name: str,
            monitor: str,
            higher_is_better: bool,
            best: float | None,
            keep: int | None,
        ):
            super().__init__()
            self.run_dir = run_dir
            self.best_path = run_dir / best_name
            self.monitor = monitor
            self.higher_is_better = higher_is_better
            self.best = best
            self.keep = keep
            self._warned = False

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            save_model_atomically(self.model, checkpoint_path(self.run_dir, epoch + 1))
            value = logs.get(self.monitor)
            if value is None:
                if not self._warned:
                    logger.warning("%s not logged: saving the latest model as best", self.monitor)
                    self._warned = True
                improved = True
            else:
                value = float(value)
                improved = self.best is None or (
                    value > self.best if self.higher_is_better else value < self.best
                )
            if improved:
                if value is not None:
                    logger.info("epoch %d: %s improved to %.6g", epoch + 1, self.monitor, value)
                    self.best = value
                save_model_atomically(self.model, self.best_path)
            self._prune()

        def _prune(self) -> None:
            if self.keep is None:
                return
            found = list_checkpoints(self.run_dir)
            for _, path in found[: max(0, len(found) - self.keep)]:
                path.unlink(missing_ok=True)

    class GiveUpBelow(keras.callbacks.Callback):
        """Stop training once the logged value `name` stayed under `floor` for `patience`
        epochs in a row (the count restarts on resume)."""

        def __init__(self, name: str, floor: float, patience: int):
            super().__init__()
            self.name, self.floor, self.patience = name, floor, patience
            self.under = 0

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.name)
            self.under = self.under + 1 if value is not None and value < self.floor else 0
            if self.under >= self.patience:
                logger.info("epoch %d: %s under %g for %d epochs: the run learns nothing, "
                            "stopped", epoch + 1, self.name, self.floor, self.under)
                self.model.stop_training = True

    return NonFiniteGuard, EpochCheckpoint, GiveUpBelow


def _best_so_far(rows: list[dict[str, str]], monitor: str, higher_is_better: bool) -> float | None:
    values = [float(row[monitor]) for row in rows if _finite(row.get(monitor, "nan"))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    return max(values) if higher_is_better else min(values)


def fit(
    build_model: Callable[[], Any],
    train_data: Any,
    val_data: Any,
    run_dir: str | os.PathLike,
    *,
    epochs: int,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    resume: bool = False,
    best_name: str = "model.keras",
    monitor: str = "val_loss",
    early_stopping_patience: int | None = None,
    give_up_below: tuple[str, float] | None = None,
    keep_checkpoints: int | None = None,
    strategy: Any = None,
    verbose: int | str = "auto",
    prepare_model: Callable[[Any], Any] | None = None,
) -> Any:
    """Train a model into a run folder, with per-epoch checkpoints, resume and a NaN guard.

    Args:
        build_model: called with no argument, returns a compiled Keras model. It runs inside
            `strategy.scope()`, and only when training starts afresh (a resumed run loads its
            model, compiled with its optimizer state, from the last checkpoint).
        train_data: what `keras.Model.fit` accepts as `x` (a tf.data.Dataset of (x, y) batches).
        val_data: validation data in the same form, or None.
        run_dir: the run folder (created if missing). See the module docstring for its layout.
        epochs: the total number of epochs of the run (not the number still to do).
        steps_per_epoch: batches per epoch (needed for endless datasets).
        validation_steps: validation batches per epoch (needed for endless datasets).
        resume: continue from the newest checkpoint of `run_dir`: its model and optimizer
            state, epoch numbering (`initial_epoch`), best value so far and history.csv (rows
            of epochs after the checkpoint are dropped, so every epoch appears once). With no
            checkpoint yet (killed during the first epoch) training starts afresh, with a
            warning, so `--resume` can always be passed.
        best_name: file name of the best model inside `run_dir`.
        monitor: logged quantity that picks the best model (and drives early stopping):
            larger is better for accuracy/AUC-like names (`HIGHER_IS_BETTER`), else smaller.
        early_stopping_patience: stop after this many epochs without improvement of
            `monitor` (None: never). The patience count restarts on resume.
        give_up_below: (logged name, floor): also stop once that value stayed under the floor
            for `early_stopping_patience` epochs in a row (a run that learns nothing; e.g. a
            classifier's `val_prediction_spread`, `kdsb.models.spread`).
        keep_checkpoints: keep only the newest this many epoch checkpoints (None: all).
        strategy: a `tf.distribute` strategy (None: the default one); see
            `distribution_strategy`. Under multiworker, only the chief writes `run_dir`
            (`strategy.extended.should_checkpoint`); the others write into a temporary folder
            that is removed before returning, and all of them resume from `run_dir`.
        verbose: passed to `keras.Model.fit`.
        prepare_model: called with the model, built or loaded from a checkpoint, before it
            trains; returns the model. For how its steps are computed, not what is saved
            (`kdsb.models.slabs`): a loaded checkpoint computes the plain way again.

    Returns:
        The `keras.callbacks.History` of the epochs run now; `history.model` is the trained
        model (its latest weights; the best ones are in `run_dir/best_name`).

    Raises:
        UsageError: `run_dir` already holds checkpoints but `resume` is False.
        TrainingError: the loss or a metric became NaN or infinite; the message names the epoch,
            the batch and the last good checkpoint, which stays loadable.
    """
    import tensorflow as tf

    run_dir = Path(run_dir)
    strategy = strategy or tf.distribute.get_strategy()
    # The chief writes the run folder; another worker of a multi-worker run writes the same
    # files (every worker must save: saving may read variables collectively) into a temporary
    # folder of its own, removed at the end. All of them read the run folder to resume.
    chief = strategy.extended.should_checkpoint
    out_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="kdsb-worker-"))
    try:
        return _fit(build_model, _distribute(strategy, train_data),
                    _distribute(strategy, val_data), run_dir, out_dir, strategy, epochs=epochs,
                    steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                    resume=resume, best_name=best_name, monitor=monitor,
                    early_stopping_patience=early_stopping_patience,
                    give_up_below=give_up_below,
                    keep_checkpoints=keep_checkpoints, verbose=verbose,
                    prepare_model=prepare_model)
    finally:
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)


def _fit(build_model, train_data, val_data, run_dir: Path, out_dir: Path, strategy, *,
         epochs, steps_per_epoch, validation_steps, resume, best_name, monitor,
         early_stopping_patience, give_up_below, keep_checkpoints, verbose, prepare_model):
    """`fit` reading the run from `run_dir` and writing into `out_dir`."""
    import keras

    chief = out_dir == run_dir
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(run_dir)
    higher = _higher_is_better(monitor)
    history_path = out_dir / HISTORY_NAME
    last = check_run_dir(run_dir, resume)
    if resume and last is None:
        logger.warning("no checkpoint in %s: starting afresh", run_dir / CHECKPOINT_DIR)
    if last is not None:
        initial_epoch, path = last
        logger.info("resuming from %s (epoch %d of %d)", path, initial_epoch, epochs)
        with strategy.scope():
            model = keras.saving.load_model(path, compile=True, safe_mode=True)
        rows = _truncate_history(run_dir / HISTORY_NAME, initial_epoch, write=chief)
    else:
        initial_epoch = 0
        with strategy.scope():
            model = build_model()
        if chief:
            history_path.unlink(missing_ok=True)
        rows = []
    if prepare_model is not None:
        model = prepare_model(model)

    NonFiniteGuard, EpochCheckpoint, GiveUpBelow = _callback_classes()
    csv_logger = keras.callbacks.CSVLogger(str(history_path), append=True)
    # Order matters: the guard first (nothing is written for a non-finite model), then the
    # history row, then the checkpoint. A kill between the last two leaves one row too many,
    # which resuming drops; the reverse order would lose a row for good.
    callbacks = [
        NonFiniteGuard(run_dir),
        csv_logger,
        EpochCheckpoint(
            out_dir,
            best_name,
            monitor,
            higher,
            _best_so_far(rows, monitor, higher),
            keep_checkpoints,
        ),
    ]
    # TensorBoard may be missing from a hand-made environment: the run then goes on unlogged.
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(
            keras.callbacks.TensorBoard(
                log_dir=str(out_dir / TENSORBOARD_DIR), update_freq="epoch", profile_batch=0
            )
        )
    elif chief:
        logger.warning("tensorboard is not installed: no TensorBoard logs in %s", run_dir)
    if early_stopping_patience is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=early_stopping_patience, mode="max" if higher else "min"
            )
        )
        if give_up_below is not None:
            callbacks.append(GiveUpBelow(*give_up_below, early_stopping_patience))

    if initial_epoch >= epochs:
        logger.info("run already has %d of %d epochs: nothing to do", initial_epoch, epochs)
    try:
        history = model.fit(
            train_data,
            validation_data=val_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # datasets shuffle themselves; Keras cannot shuffle a tf.data input
        )
    finally:
        csv_logger.on_train_end()  # closes history.csv also when the NaN guard fired
    return history
