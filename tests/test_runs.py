"""kdsb.training.runs: checkpoints, best model, history, resume, NaN guard, runtime options."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from kdsb.errors import TrainingError, UsageError
from kdsb.training import runs

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

FEATURES = 3
BATCH = 4
STEPS = 3


def _data(seed: int, nan_at_batch: int | None = None):
    """An endless dataset of linear-regression batches; optionally one batch of NaN targets."""
    rng = np.random.default_rng(seed)
    batches = 64
    x = rng.normal(size=(batches, BATCH, FEATURES)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5], "float32"))[..., None]
    if nan_at_batch is not None:
        y[nan_at_batch] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat()


def _build():
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def _fit(run_dir, epochs, **kwargs):
    return runs.fit(
        _build,
        kwargs.pop("train", _data(0)),
        _data(1),
        run_dir,
        epochs=epochs,
        steps_per_epoch=STEPS,
        validation_steps=2,
        verbose=0,
        **kwargs,
    )


def test_fit_writes_checkpoints_history_and_best(tmp_path):
    runs.configure_runtime(seed=0)
    history = _fit(tmp_path, 3, best_name="best.keras")
    for epoch in (1, 2, 3):
        assert runs.checkpoint_path(tmp_path, epoch).is_file()
    assert runs.last_checkpoint(tmp_path) == (3, runs.checkpoint_path(tmp_path, 3))
    rows = runs.read_history(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    val = [float(r["val_loss"]) for r in rows]
    np.testing.assert_allclose(val, history.history["val_loss"], rtol=1e-5)
    best_epoch = int(np.argmin(val)) + 1
    best = keras.saving.load_model(tmp_path / "best.keras", safe_mode=True)
    at_best = keras.saving.load_model(runs.checkpoint_path(tmp_path, best_epoch))
    for a, b in zip(best.get_weights(), at_best.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "logs").is_dir()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_fit_refuses_a_used_run_dir_without_resume(tmp_path):
    runs.configure_runtime(seed=0)
    _fit(tmp_path, 1)
    with pytest.raises(UsageError, match="--resume"):
        _fit(tmp_path, 2)


def test_resume_continues_epochs_and_optimizer_state(tmp_path):
    runs.configure_runtime(seed=0)
    first = _fit(tmp_path, 2)
    assert int(first.model.optimizer.iterations) == 2 * STEPS
    # A kill between the history row and the checkpoint of epoch 3 leaves an extra row.
    with (tmp_path / "history.csv").open("a") as f:
        f.write("2,0.5,0.5\n")
    loaded = keras.saving.load_model(runs.checkpoint_path(tmp_path, 2))
    assert int(loaded.optimizer.iterations) == 2 * STEPS
    moments = [v.numpy() for v in loaded.optimizer.variables if "momentum" in v.path]
    assert moments and any(np.abs(m).sum() > 0 for m in moments)

    second = _fit(tmp_path, 4, resume=True)
    assert second.epoch == [2, 3]
    assert int(second.model.optimizer.iterations) == 4 * STEPS
    rows = runs.read_history(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert runs.last_checkpoint(tmp_path)[0] == 4


def test_a_damaged_checkpoint_is_passed_over_on_resume(tmp_path, caplog):
    """Found by a user's check: a checkpoint cut short stopped `--resume` with Keras's "File not
    found" in a traceback. The checkpoint before it is resumed, its epochs trained again; with
    none that loads, a one-line error."""
    runs.configure_runtime(seed=0)
    _fit(tmp_path, 3)
    newest = runs.checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        resumed = _fit(tmp_path, 4, resume=True)
    assert (f"{newest}: does not load (" in caplog.text
            and "resuming from the checkpoint before it if that loads" in caplog.text)
    assert resumed.epoch == [2, 3]  # epochs 3 and 4, from epoch 2's checkpoint
    rows = runs.read_history(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert runs.last_checkpoint(tmp_path)[0] == 4
    keras.saving.load_model(newest)  # written again whole
    for _, path in runs.list_checkpoints(tmp_path):
        path.write_bytes(b"damaged")
    with pytest.raises(TrainingError, match=r"checkpoints: expected a checkpoint that loads, "
                                            r"received none that does \(the last: .+\): "
                                            r"restore them, or start afresh"):
        _fit(tmp_path, 5, resume=True)


MOMENTUM = 0.8


def _build_averaged():
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=MOMENTUM),
                  loss="mse")
    return model


def _one_batch():
    """The same batch every step (so a resumed run takes the uninterrupted one's steps)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5], "float32"))[:, None]
    return x, y, tf.data.Dataset.from_tensors((x, y)).repeat()


def _raw_and_averaged(x, y, steps: int):
    """The weights after each of `steps` steps on (x, y) of `_build`'s model (seeded as a run
    is), and their moving average by Keras's rule (the first step's weights, then the EMA)."""
    runs.configure_runtime(seed=0)
    reference = _build()
    raw = []
    for _ in range(steps):
        reference.train_on_batch(x, y)
        raw.append(reference.get_weights())
    averages = [[np.array(w) for w in raw[0]]]
    for weights in raw[1:]:
        averages.append([MOMENTUM * a + (1 - MOMENTUM) * w
                         for a, w in zip(averages[-1], weights, strict=True)])
    return raw, averages


def _assert_weights_close(model, weights, **tolerance):
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(a, b, **tolerance)


def test_a_run_with_averaged_weights_validates_and_saves_the_average_and_resumes_as_one(
        tmp_path):
    """An optimizer with `use_ema`: the logged validation loss, the checkpoints and the best
    model are the moving average's (a NumPy reference of the raw weights' average), and a run
    resumed from a checkpoint trains on as the uninterrupted one did (the raw weights go on
    from where they were, not from the average)."""
    x, y, one_batch = _one_batch()
    epochs = 4
    raw, averages = _raw_and_averaged(x, y, epochs * STEPS)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    runs.configure_runtime(seed=0)
    history = runs.fit(_build_averaged, one_batch, _data(1), whole, epochs=epochs,
                       steps_per_epoch=STEPS, validation_steps=2, verbose=0, best_name="best.keras")
    rows = runs.read_history(whole / "history.csv")
    for epoch in range(1, epochs + 1):
        saved = keras.saving.load_model(runs.checkpoint_path(whole, epoch), safe_mode=True)
        _assert_weights_close(saved, averages[epoch * STEPS - 1], rtol=1e-5, atol=1e-6)
        logged = float(rows[epoch - 1]["val_loss"])
        assert saved.evaluate(_data(1), steps=2, verbose=0) == pytest.approx(logged, rel=1e-5)
    _assert_weights_close(history.model, raw[-1], rtol=1e-5, atol=1e-6)  # `fit` ends raw

    runs.configure_runtime(seed=0)
    runs.fit(_build_averaged, one_batch, _data(1), parts, epochs=2, steps_per_epoch=STEPS,
             validation_steps=2, verbose=0, best_name="best.keras")
    runs.fit(_build_averaged, one_batch, _data(1), parts, epochs=epochs, steps_per_epoch=STEPS,
             validation_steps=2, verbose=0, best_name="best.keras", resume=True)
    for name in (runs.checkpoint_path(whole, epochs), whole / "best.keras"):
        resumed = keras.saving.load_model(parts / name.relative_to(whole), safe_mode=True)
        uninterrupted = keras.saving.load_model(name, safe_mode=True)
        _assert_weights_close(resumed, uninterrupted.get_weights(), rtol=1e-6)


def test_the_average_is_saved_also_behind_a_loss_scale_optimizer(tmp_path):
    """Mixed float16 wraps the optimizer in Keras's loss-scale optimizer, whose own `use_ema`
    is off (found in review: the average was kept but never validated or saved)."""
    x, y, one_batch = _one_batch()
    _, averages = _raw_and_averaged(x, y, STEPS)

    def build():
        model = _build_averaged()
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(model.optimizer),
                      loss="mse")
        return model

    runs.configure_runtime(seed=0)
    runs.fit(build, one_batch, _data(1), tmp_path, epochs=1, steps_per_epoch=STEPS,
             validation_steps=2, verbose=0)
    saved = keras.saving.load_model(runs.checkpoint_path(tmp_path, 1), safe_mode=True)
    _assert_weights_close(saved, averages[-1], rtol=1e-5, atol=1e-6)


def _rewrite_val_loss(run_dir, values):
    path = run_dir / "history.csv"
    lines = path.read_text().splitlines()
    column = lines[0].split(",").index("val_loss")
    rows = [line.split(",") for line in lines[1:]]
    for row, value in zip(rows, values, strict=True):
        row[column] = str(value)
    path.write_text("\n".join([lines[0], *(",".join(row) for row in rows)]) + "\n")


@pytest.mark.parametrize(("patience", "epochs_run"), [(2, 0), (3, 1)])
def test_early_stopping_goes_on_from_the_history_when_resumed(tmp_path, patience, epochs_run):
    """Found in review: Keras's early stopping started afresh on resume (the first resumed
    epoch counted as the best, the patience restarted), so a resumed run trained on where the
    uninterrupted one stopped. History: best at epoch 1, then two epochs without improvement."""
    runs.configure_runtime(seed=0)
    _fit(tmp_path, 3)
    _rewrite_val_loss(tmp_path, [1e-6, 5.0, 6.0])  # nothing beats 1e-6
    resumed = _fit(tmp_path, 10, resume=True, early_stopping_patience=patience)
    assert len(resumed.epoch) == epochs_run
    assert len(runs.read_history(tmp_path / "history.csv")) == 3 + epochs_run
    finished = json.loads((tmp_path / "finished.json").read_text())
    assert finished == {"epochs_run": 3 + epochs_run, "stopped_early": True,
                        "patience": patience}


@pytest.mark.parametrize(("min_epochs", "epochs_run"), [(0, 0), (6, 3), (2, 0)])
def test_early_stopping_ends_no_run_before_min_epochs(tmp_path, min_epochs, epochs_run):
    """History: best at epoch 1, then two epochs without improvement, so patience 2 has run
    out; with --min-epochs 6 the run trains on to its sixth epoch (nothing beats the best),
    and a finished run given a larger --min-epochs than it ran trains on."""
    runs.configure_runtime(seed=0)
    _fit(tmp_path, 3)
    _rewrite_val_loss(tmp_path, [1e-6, 5.0, 6.0])  # nothing beats 1e-6
    resumed = _fit(tmp_path, 10, resume=True, early_stopping_patience=2,
                   early_stopping_min_epochs=min_epochs)
    assert len(resumed.epoch) == epochs_run
    assert len(runs.read_history(tmp_path / "history.csv")) == 3 + epochs_run
    finished = json.loads((tmp_path / "finished.json").read_text())
    assert finished == {"epochs_run": 3 + epochs_run, "stopped_early": True, "patience": 2}
    assert runs.finished_training(tmp_path, 10, 2, min_epochs)
    assert not runs.finished_training(tmp_path, 10, 2, 3 + epochs_run + 1)


def test_a_finished_run_whose_checkpoints_were_deleted_stays_finished(tmp_path, caplog):
    """Found in review: with its checkpoints deleted to save space, a finished run resumed
    started afresh and overwrote its best model. It says it trains nothing (found by a user's
    trial: a resumed finished run looked as if it had trained again)."""
    import logging
    import shutil

    runs.configure_runtime(seed=0)
    _fit(tmp_path, 2, best_name="best.keras")
    shutil.rmtree(tmp_path / "checkpoints")
    stamp = (tmp_path / "best.keras").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="kdsb.training.runs.fitting"):
        resumed = _fit(tmp_path, 2, resume=True, best_name="best.keras")
    assert f"{tmp_path} had finished training (finished.json): nothing to train" in caplog.text
    assert resumed.epoch == []
    best = keras.saving.load_model(tmp_path / "best.keras", compile=False)
    for mine, saved in zip(resumed.model.weights, best.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(saved))
    assert (tmp_path / "best.keras").stat().st_mtime_ns == stamp
    assert not (tmp_path / "checkpoints").exists()
    # Its best model damaged: one line naming it (found in review: Keras's traceback).
    (tmp_path / "best.keras").write_bytes(b"PK damaged")
    with pytest.raises(TrainingError, match=r"best.keras: expected a model this run saved, "
                                            r"received one that does not load"):
        _fit(tmp_path, 2, resume=True, best_name="best.keras")


def test_a_damaged_record_is_a_one_line_error_naming_it(tmp_path):
    """Found in review: a damaged finished.json (or split.json, fold.json, restarts.json) was
    a JSONDecodeError traceback."""
    from kdsb.errors import KdsbError

    runs.configure_runtime(seed=0)
    _fit(tmp_path, 1)
    (tmp_path / "finished.json").write_text('{"epochs_run": 1, ')
    with pytest.raises(KdsbError, match=r"finished.json: expected a JSON record, received an "
                                        r"unreadable or damaged file \(.*\): restore it"):
        _fit(tmp_path, 1, resume=True)
    (tmp_path / "finished.json").write_text('{"epochs_run": 1}')  # valid JSON, keys missing
    with pytest.raises(KdsbError, match=r"finished.json: expected a JSON record of epochs_run, "
                                        r"stopped_early and patience"):
        _fit(tmp_path, 1, resume=True)
    (tmp_path / "split.json").write_text("")
    with pytest.raises(KdsbError, match="split.json: expected a JSON record"):
        runs.check_split(tmp_path, {"train_ids": ["a"]}, resume=True)


def test_resume_without_checkpoint_starts_afresh(tmp_path, caplog):
    """Warned of only where epochs were trained and their checkpoints are gone (found by a
    user's trial: a fold not yet begun, or a restart, warned too)."""
    import logging
    import shutil

    runs.configure_runtime(seed=0)
    with caplog.at_level(logging.WARNING, logger="kdsb.training.runs.fitting"):
        history = _fit(tmp_path / "new", 1, resume=True)
    assert history.epoch == [0] and "starting afresh" not in caplog.text
    shutil.rmtree(tmp_path / "new" / "checkpoints")
    (tmp_path / "new" / "finished.json").unlink()
    with caplog.at_level(logging.WARNING, logger="kdsb.training.runs.fitting"):
        assert _fit(tmp_path / "new", 1, resume=True).epoch == [0]
    assert "no checkpoint in" in caplog.text and "starting afresh" in caplog.text


def test_keep_checkpoints_prunes_old_epochs(tmp_path):
    runs.configure_runtime(seed=0)
    _fit(tmp_path, 3, keep_checkpoints=1)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch_0003.keras"]


def test_pruning_keeps_the_best_epoch_s_checkpoint(tmp_path):
    """The best model's source on resume (`restore_best_model`; found in review: a pruned
    best epoch left a best model of a dropped epoch in place)."""
    from kdsb.training.runs.callbacks import callback_classes

    for epoch in (1, 2, 3, 4):
        runs.checkpoint_path(tmp_path, epoch).parent.mkdir(exist_ok=True)
        runs.checkpoint_path(tmp_path, epoch).write_bytes(b"")
    checkpoint = callback_classes()[1](tmp_path, "best.keras", "val_loss", False, 0.1, 2, 1)
    checkpoint._prune()
    assert [epoch for epoch, _ in runs.list_checkpoints(tmp_path)] == [2, 4]


def test_nan_loss_stops_with_epoch_and_keeps_last_good_checkpoint(tmp_path):
    runs.configure_runtime(seed=0)
    nan_batch = STEPS + 1  # second batch (1-based: 2) of the second epoch
    with pytest.raises(TrainingError) as raised:
        _fit(tmp_path, 4, train=_data(0, nan_at_batch=nan_batch))
    message = str(raised.value)
    assert "epoch 2 batch 2" in message
    assert "epoch_0001.keras" in message and "--lr" in message
    assert runs.last_checkpoint(tmp_path)[0] == 1
    good = keras.saving.load_model(runs.checkpoint_path(tmp_path, 1), safe_mode=True)
    assert all(np.isfinite(w).all() for w in good.get_weights())
    rows = runs.read_history(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [0]


def test_configure_runtime_sets_policy_and_validates():
    runs.configure_runtime(seed=1, precision="mixed_bfloat16")
    try:
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        runs.configure_runtime(seed=1, precision="float32")
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(UsageError, match="expected a precision"):
        runs.configure_runtime(seed=1, precision="float8")


def test_float16_without_a_gpu_is_warned_of(caplog):
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    try:
        runs.configure_runtime(seed=1, precision="mixed_float16")
    finally:
        runs.configure_runtime(seed=1, precision="float32")
    assert ("mixed_float16 without a GPU" in caplog.text) is not gpu
    caplog.clear()
    runs.configure_runtime(seed=1, precision="mixed_bfloat16")
    runs.configure_runtime(seed=1, precision="float32")
    assert "without a GPU" not in caplog.text


def test_configure_runtime_seeds_reproducibly():
    runs.configure_runtime(seed=7)
    a = keras.random.normal((4,)).numpy()
    runs.configure_runtime(seed=7)
    b = keras.random.normal((4,)).numpy()
    np.testing.assert_array_equal(a, b)


def test_configure_runtime_turns_op_determinism_on():
    runs.configure_runtime(seed=3)
    runs.configure_runtime(seed=3)  # again: harmless
    # TensorFlow has no public getter; its documented effect: tf.timestamp refuses to run.
    with pytest.raises(tf.errors.FailedPreconditionError, match="determinism"):
        tf.timestamp()
    # Seeded random ops still run.
    assert tf.random.normal((2,)).shape == (2,)


def test_distribution_strategy_names():
    assert runs.distribution_strategy("none") is tf.distribute.get_strategy()
    with pytest.raises(UsageError, match="expected a strategy"):
        runs.distribution_strategy("tpu")


def _saved_run(run_dir, options):
    """A run folder as a killed run leaves it: its options and a (here empty) checkpoint."""
    runs.begin(run_dir, options, data_dir=run_dir)
    runs.checkpoint_path(run_dir, 2).parent.mkdir()
    runs.checkpoint_path(run_dir, 2).write_bytes(b"")


def test_options_read_their_flags_and_defaults_from_the_dataclass():
    import argparse

    parser = argparse.ArgumentParser()
    runs.add_options(parser, runs.RunOptions)
    assert runs.given_options(parser.parse_args([]), runs.RunOptions) == {}
    args = parser.parse_args(["--epochs", "3", "--keep-checkpoints", "2"])
    assert runs.given_options(args, runs.RunOptions) == {"epochs": 3, "keep_checkpoints": 2}
    assert "(default: 20)" in parser.format_help()
    with pytest.raises(UsageError, match="expected --val-fraction in"):
        runs.RunOptions(val_fraction=1.0)
    with pytest.raises(UsageError, match="expected --keep-checkpoints >= 1, received 0"):
        runs.RunOptions(keep_checkpoints=0)
    with pytest.raises(UsageError, match="expected a finite --lr, received inf"):
        runs.RunOptions(lr=float("inf"))


def test_a_subclass_s_numbers_must_be_finite_too():
    """Found in review: --variance-floor inf passed its check (> 0) and failed in Keras."""
    from kdsb.training.classifier_options import ClassifierOptions
    from kdsb.training.gmcae import GmcaeOptions

    with pytest.raises(UsageError, match="expected a finite --variance-floor, received inf"):
        GmcaeOptions(variance_floor=float("inf"))
    with pytest.raises(UsageError, match="expected a finite --label-smoothing, received nan"):
        ClassifierOptions(gmcae="g.keras", label_smoothing=float("nan"))
    # Tuples too (found in review: an options dict or a resumed config.json can hold them).
    with pytest.raises(UsageError, match=r"expected a finite --levels, received \(1, inf\)"):
        ClassifierOptions(gmcae="g.keras", levels=(1, float("inf")))
    with pytest.raises(UsageError, match=r"expected --levels of integers >= 1, received \(1.5,\)"):
        ClassifierOptions(gmcae="g.keras", levels=(1.5,))


def test_a_file_option_is_saved_absolute_and_resumes_from_another_folder(tmp_path,
                                                                         monkeypatch):
    """Found in review: a relative --gmcae was saved as typed, and a run resumed from another
    working folder was refused with the GMCAE "missing"."""
    from kdsb.training.classifier_options import ClassifierOptions

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "gmcae.keras").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    options = ClassifierOptions(gmcae="runs/gmcae.keras")
    assert options.gmcae == str(tmp_path / "runs" / "gmcae.keras")
    run_dir = tmp_path / "run"
    runs.begin(run_dir, options, data_dir=tmp_path, resume=False)
    assert json.loads((run_dir / "config.json").read_text())["gmcae"] == options.gmcae
    monkeypatch.chdir(tmp_path / "runs")
    resumed, _ = runs.resolve_options(ClassifierOptions, {}, run_dir, resume=True,
                                      data_dir=tmp_path)
    assert resumed.gmcae == options.gmcae


def test_resolve_options_afresh_and_on_resume(tmp_path):
    # A mistyped RUN_DIR with --resume is refused, not a default run begun (found by users'
    # checks).
    for where, state in ((tmp_path, "a folder without"), (tmp_path / "typo", "a missing")):
        with pytest.raises(UsageError, match=f"received {state}.*leave out --resume"):
            runs.resolve_options(runs.RunOptions, {}, where, resume=True, data_dir=tmp_path)
    options, done = runs.resolve_options(
        runs.RunOptions, {"lr": 0.5}, tmp_path, resume=False, data_dir=tmp_path
    )
    assert (options, done) == (runs.RunOptions(lr=0.5), 0)
    _saved_run(tmp_path, options)
    with pytest.raises(UsageError, match="--resume"):
        runs.resolve_options(runs.RunOptions, {}, tmp_path, resume=False, data_dir=tmp_path)
    resumed, done = runs.resolve_options(
        runs.RunOptions, {"epochs": 30, "keep_checkpoints": 1, "seed": 0}, tmp_path, resume=True,
        data_dir=tmp_path,
    )
    assert done == 2
    assert resumed == runs.RunOptions(lr=0.5, epochs=30, keep_checkpoints=1)
    with pytest.raises(UsageError, match=r"expected --lr 0.5 as saved in .*config.json when "
                                         r"resuming, received 0.1; only --epochs, --patience"):
        runs.resolve_options(runs.RunOptions, {"lr": 0.1}, tmp_path, resume=True,
                             data_dir=tmp_path)


@pytest.mark.parametrize("key, saved, given, expected", [
    ("allow_unlabelled", False, True, "expected no --allow-unlabelled as saved in"),
    ("augment", True, False, "expected no --no-augment as saved in"),
    ("augment", False, True, "expected --no-augment as saved in"),
    ("mask_outside_lungs", True, False, "expected --mask-outside-lungs as saved in"),
])
def test_a_refused_on_off_option_is_said_as_its_flag(tmp_path, key, saved, given, expected):
    """Found by a user's trial: "expected --allow-unlabelled False as saved …, received True"."""
    from kdsb.training.classifier_options import ClassifierOptions

    gmcae, run_dir = tmp_path / "g.keras", tmp_path / "run"
    gmcae.touch()
    run_dir.mkdir()
    _saved_run(run_dir, ClassifierOptions(gmcae=str(gmcae), **{key: saved}))
    with pytest.raises(UsageError) as raised:
        runs.resolve_options(ClassifierOptions, {key: given}, run_dir, resume=True,
                             data_dir=run_dir)
    message = str(raised.value)
    assert message.startswith(expected)
    assert "True" not in message and "False" not in message
    flag = {"allow_unlabelled": "--allow-unlabelled", "augment": "--no-augment",
            "mask_outside_lungs": "--no-mask-outside-lungs"}[key]
    received = flag if key != "augment" or not given else f"no {flag}"
    assert f"when resuming, received {received}; only" in message


def test_a_run_whose_predictions_stay_flat_is_given_up(tmp_path):
    """give_up_below: a model whose first kernel is frozen at zero answers every input alike
    (validation spread 0, `kdsb.models.spread`) and stops after `patience` epochs although its
    validation loss keeps improving (its last bias learns the targets' offset); without the
    floor it runs on, and so does a model whose predictions spread."""
    from kdsb.models.spread import PredictionSpread

    def build(frozen: bool):
        model = keras.Sequential([
            keras.Input((FEATURES,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", trainable=not frozen),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse",
                      metrics=[PredictionSpread()])
        return model

    def offset(seed):
        return _data(seed).map(lambda x, y: (x, y + 10.0))

    runs.configure_runtime(seed=0)
    for frozen, floor, epochs_run in ((True, 1e-3, 2), (True, None, 6), (False, 1e-3, 6)):
        run_dir = tmp_path / f"{frozen}_{floor}"
        runs.fit(lambda frozen=frozen: build(frozen), offset(0), offset(1), run_dir, epochs=6,
                 steps_per_epoch=STEPS, validation_steps=2, verbose=0, early_stopping_patience=2,
                 give_up_below=None if floor is None else ("val_prediction_spread", floor))
        rows = runs.read_history(run_dir / "history.csv")
        assert len(rows) == epochs_run, (frozen, floor)
        assert (float(rows[-1]["val_prediction_spread"]) == 0.0) == frozen


def test_prediction_spread_is_max_minus_min_over_batches():
    from kdsb.models.spread import PredictionSpread

    metric = PredictionSpread()
    assert float(metric.result()) == 0.0
    p = np.random.default_rng(0).uniform(0.2, 0.7, size=(10, 1)).astype("float32")
    metric.update_state(np.zeros_like(p[:4]), p[:4])
    metric.update_state(np.zeros_like(p[4:]), p[4:])
    assert float(metric.result()) == pytest.approx(float(np.ptp(p)))
    metric.reset_state()
    metric.update_state(np.zeros((2, 1)), np.full((2, 1), 0.5))
    assert float(metric.result()) == 0.0


def test_discarding_a_run_removes_its_checkpoints_before_setting_its_files_aside(
        tmp_path, monkeypatch):
    """A kill while a restarted run is cleared never leaves checkpoints without their history
    (a resume would go on with the discarded weights): they go first; then the models and
    history.csv are renamed with the prefix, replacing an earlier copy."""
    from pathlib import Path

    from kdsb.training.runs import discard_training

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch_0001.keras").write_text("weights")
    (tmp_path / "model.keras").write_text("model")
    (tmp_path / "history.csv").write_text("epoch\n0\n")
    (tmp_path / "aside_history.csv").write_text("an earlier copy")

    def killed(self, target):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            discard_training(tmp_path, "aside_", ("model.keras", "head.keras"))
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "model.keras").is_file()
    discard_training(tmp_path, "aside_", ("model.keras", "head.keras"))
    assert (tmp_path / "aside_model.keras").read_text() == "model"
    assert (tmp_path / "aside_history.csv").read_text() == "epoch\n0\n"
    assert not (tmp_path / "model.keras").exists() and not (tmp_path / "history.csv").exists()


def _assert_same_weights(path, other):
    saved, expected = (keras.saving.load_model(p, safe_mode=True) for p in (path, other))
    for a, b in zip(saved.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_kill_before_the_best_model_is_mended_on_resume(tmp_path, monkeypatch):
    """The checkpoint is written before the best model (a copy of it): killed between the two,
    the resumed run copies the better epoch's checkpoint as the best model."""
    from kdsb.training.runs import callbacks

    class Killed(Exception):
        pass

    def killed_while_copying(source, path):
        raise Killed

    runs.configure_runtime(seed=0)
    with monkeypatch.context() as patched:
        patched.setattr(callbacks, "copy_model_atomically", killed_while_copying)
        with pytest.raises(Killed):
            _fit(tmp_path, 2, best_name="best.keras")
    assert runs.last_checkpoint(tmp_path)[0] == 1 and not (tmp_path / "best.keras").exists()
    _rewrite_val_loss(tmp_path, [1e-9])  # epoch 1 stays the best: only the mending copies it
    _fit(tmp_path, 2, resume=True, best_name="best.keras")
    _assert_same_weights(tmp_path / "best.keras", runs.checkpoint_path(tmp_path, 1))


def test_a_best_model_of_an_epoch_dropped_on_resume_is_replaced(tmp_path):
    """Found in review: with the newest checkpoint damaged, the resumed run dropped its epoch
    while the best model still held it (its reported best epoch said otherwise). The kept
    rows' best epoch's checkpoint becomes the best model again."""
    runs.configure_runtime(seed=0)
    _fit(tmp_path, 3, best_name="best.keras")
    _rewrite_val_loss(tmp_path, [5.0, 1e-6, 1e-7])  # epoch 3 the best, then 2; nothing beats them
    newest = runs.checkpoint_path(tmp_path, 3)
    shutil.copyfile(newest, tmp_path / "best.keras")
    newest.write_bytes(newest.read_bytes()[:1000])
    _fit(tmp_path, 4, resume=True, best_name="best.keras")  # epochs 3 and 4 trained again
    _assert_same_weights(tmp_path / "best.keras", runs.checkpoint_path(tmp_path, 2))
    # A damaged checkpoint of the best epoch is not copied over a best model that opens.
    runs.checkpoint_path(tmp_path, 2).write_bytes(b"damaged")
    _rewrite_val_loss(tmp_path, [5.0, 1e-6, 1.0, 2.0])
    (tmp_path / "finished.json").unlink()
    _fit(tmp_path, 5, resume=True, best_name="best.keras")
    keras.saving.load_model(tmp_path / "best.keras", safe_mode=True)


def test_a_finished_run_resumed_trains_nothing_unless_asked_for_more(tmp_path):
    """Resumed after its training ended (a kill while its results were written), a run trains
    no further epochs, which would make another model than the uninterrupted run (found in
    review: early stopping's count restarted and trained `patience` more epochs)."""
    import json

    runs.configure_runtime(seed=0)
    _fit(tmp_path, 2, best_name="best.keras")
    marker = tmp_path / "finished.json"
    assert json.loads(marker.read_text()) == {"epochs_run": 2, "stopped_early": False,
                                              "patience": None}
    rows = (tmp_path / "history.csv").read_text()
    again = _fit(tmp_path, 2, best_name="best.keras", resume=True)
    assert again.epoch == [] and again.model is not None
    assert (tmp_path / "history.csv").read_text() == rows
    # Stopped early with patience 3: the same patience trains nothing, a larger one trains on.
    marker.write_text(json.dumps({"epochs_run": 2, "stopped_early": True, "patience": 3}))
    assert _fit(tmp_path, 5, resume=True, early_stopping_patience=3).epoch == []
    assert _fit(tmp_path, 3, resume=True, early_stopping_patience=4).epoch == [2]
    assert json.loads(marker.read_text())["epochs_run"] == 3


def test_volumes_written_again_since_a_run_began_are_warned_of_on_resume(tmp_path, caplog):
    """Found in review: a cross-validated run resumed after `preprocess --overwrite` mixed
    folds of the former and the new volumes without a word."""
    files = {}
    for pid in ("a", "b"):
        files[pid] = tmp_path / f"{pid}.h5"
        files[pid].write_bytes(b"volume")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.note_volumes(run_dir, files, resume=False)
    with caplog.at_level(logging.WARNING, logger="kdsb.training"):
        runs.note_volumes(run_dir, files, resume=True)
        assert caplog.text == ""
        files["b"].write_bytes(b"volume written again")
        runs.note_volumes(run_dir, files, resume=True)
    assert f"1 volume file(s) written again since {run_dir} began: b; what it has trained, " \
        "scored or cached already was made of the former ones" in caplog.text
    recorded = (run_dir / runs.VOLUMES_NAME).read_bytes()
    runs.note_volumes(run_dir, files, resume=False, chief=False)  # only the chief records
    assert (run_dir / runs.VOLUMES_NAME).read_bytes() == recorded
    runs.note_volumes(run_dir, files, resume=False)  # a fresh start records them anew
    caplog.clear()
    runs.note_volumes(run_dir, files, resume=True)
    assert caplog.text == ""

