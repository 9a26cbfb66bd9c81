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
  split.json                       its training and validation patients, compared on resume
  volumes.json                     its volume files as they were (bytes, time, inode):
                                   resumed on files written again since, it warns
  .kdsb-train.lock                 held by the run writing it (`sole_run`), removed at its end
  history.csv                      one row per epoch (keras CSVLogger; `epoch` counts from 0)
  finished.json                    once training ended: epochs run, stopped early; resumed,
                                   it trains on only when it had run all its epochs and is given
                                   more, or had stopped early and is given another patience
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

Modules: `options` (`RunOptions`, flags, the resume rule), `devices` (seeds, precision, strategies,
workers), `folder` (checkpoints, history, atomic saves), `callbacks` (NaN guard, checkpoints, giving
up), `fitting` (`begin`, `train`, `fit`), `split` (the patients a model trains and validates on,
its volume files).
Their public names are importable from here.

TensorFlow is imported inside the functions, so importing this module stays light.
"""

from kdsb.training.runs.callbacks import best_epoch, best_row
from kdsb.training.runs.devices import (
    PRECISIONS,
    STRATEGIES,
    TF_CONFIG,
    Worker,
    configure_runtime,
    distribution_strategy,
    keras_verbosity,
    read_tf_config,
    wait_for_workers,
    worker,
)
from kdsb.training.runs.fitting import FINISHED_NAME, begin, finished_training, fit, train
from kdsb.training.runs.folder import (
    CHECKPOINT_DIR,
    HISTORY_NAME,
    RUN_LOCK_NAME,
    TENSORBOARD_DIR,
    check_run_dir,
    checkpoint_path,
    discard_training,
    last_checkpoint,
    list_checkpoints,
    load_saved_model,
    read_history,
    remove_checkpoints,
    remove_stale_files,
    save_model_atomically,
    sole_run,
)
from kdsb.training.runs.options import (
    OPTIONS_NAME,
    RUN_KIND_KEY,
    RunOptions,
    add_options,
    given_options,
    option,
    resolve_options,
    resumable_flags,
)
from kdsb.training.runs.split import (
    SPLIT_NAME,
    VOLUMES_NAME,
    check_split,
    note_volumes,
    pin_split,
)

__all__ = [
    "best_epoch",
    "best_row",
    "FINISHED_NAME",
    "SPLIT_NAME",
    "check_split",
    "pin_split",
    "CHECKPOINT_DIR",
    "HISTORY_NAME",
    "OPTIONS_NAME",
    "PRECISIONS",
    "STRATEGIES",
    "TENSORBOARD_DIR",
    "TF_CONFIG",
    "RunOptions",
    "Worker",
    "add_options",
    "begin",
    "check_run_dir",
    "checkpoint_path",
    "configure_runtime",
    "discard_training",
    "distribution_strategy",
    "finished_training",
    "fit",
    "given_options",
    "resumable_flags",
    "keras_verbosity",
    "last_checkpoint",
    "list_checkpoints",
    "load_saved_model",
    "option",
    "read_history",
    "remove_checkpoints",
    "remove_stale_files",
    "read_tf_config",
    "resolve_options",
    "save_model_atomically",
    "train",
    "wait_for_workers",
    "worker",
    "sole_run",
    "RUN_LOCK_NAME",
    "RUN_KIND_KEY",
    "VOLUMES_NAME",
    "note_volumes",
]
