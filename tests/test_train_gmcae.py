"""`kdsb train-gmcae`: end to end on tiny phantom volumes, resume after a kill, mirrored on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from kdsb.cli import main
from kdsb.errors import UsageError
from kdsb.io import volumes
from kdsb.training import runs
from kdsb.training.gmcae import GmcaeOptions, validation_patches
from tests.locks import lock_held_elsewhere
from tests.test_gmcae import decoder_of

keras = pytest.importorskip("keras")

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 48, 48)  # (z, y, x) voxels of 1 mm
VOLUMES = 4
# A tiny GMCAE that learns within a few seconds on 2 CPU cores.
TINY = [
    "--width", "4", "--patch-size", "16", "--mixtures", "2", "--batch-size", "8",
    "--validation-steps", "2", "--lr", "3e-3", "--seed", "0",
]
EPOCHS = 4
STEPS = 30
KILL_TIMEOUT_S = 120


def _phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small chest: air, a soft-tissue body, two lungs (-850 HU) with vessels (0 HU)."""
    z, y, x = np.indices(SHAPE)
    hu = np.full(SHAPE, -1000.0)
    hu[((y - 24) / 22) ** 2 + ((x - 24) / 23) ** 2 < 1] = 40
    lung = np.zeros(SHAPE, bool)
    for centre_x in (13, 35):
        lung |= ((z - 20) / 17) ** 2 + ((y - 24) / 15) ** 2 + ((x - centre_x) / 9) ** 2 < 1
    hu[lung] = -850
    vessels = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5) > 0.08
    hu[lung & vessels] = 0
    hu += rng.normal(0, 20, SHAPE)
    return hu.astype(np.int16), lung


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    for i in range(VOLUMES):
        hu, lung = _phantom(rng)
        volumes.write_volume(volumes.volume_path(folder, f"p{i}"), hu, lung, (1.0,) * 3, (0.0,) * 3)
    return folder


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> tuple[Path, int]:
    run_dir = tmp_path_factory.mktemp("run")
    argv = ["-q", "train-gmcae", str(data_dir), str(run_dir), *TINY,
            "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS)]
    return run_dir, main(argv)


def _epochs(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in runs.read_history(run_dir / "history.csv")]


@pytest.mark.slow
def test_train_gmcae_writes_model_plots_and_beats_single_gaussian(trained_run):
    run_dir, status = trained_run
    assert status == 0
    for name in ("gmcae.keras", "history.csv", "loss.png", "reconstructions.png",
                 "gmcae_summary.json", "config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "logs").is_dir()
    assert _epochs(run_dir) == list(range(EPOCHS))
    model = keras.saving.load_model(run_dir / "gmcae.keras", safe_mode=True)
    assert [layer.name for layer in model.layers][:2] == ["patch", "encoder"]
    summary = json.loads((run_dir / "gmcae_summary.json").read_text())
    assert summary["epochs_completed"] == EPOCHS
    assert summary["validation_patches"] == 16
    assert summary["train_patients"] + summary["val_patients"] == VOLUMES
    # Clearly better than one Gaussian fitted to the same validation patches.
    assert summary["best_val_nll_per_voxel"] < summary["single_gaussian_val_nll_per_voxel"] - 0.05
    rows = runs.read_history(run_dir / "history.csv")
    assert min(float(r["val_loss"]) for r in rows) == pytest.approx(
        summary["best_val_nll_per_voxel"]
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["width"] == 4 and config["mixtures"] == 2 and config["epochs"] == EPOCHS
    assert json.loads((run_dir / "gmcae.json").read_text()) == {"spacing_mm": [1.0, 1.0, 1.0]}
    assert config["run_kind"] == "GMCAE" and not (run_dir / runs.RUN_LOCK_NAME).exists()


@pytest.mark.parametrize("gmcae_nll, warned", [(1.13, True), (0.5, False)])
def test_a_gmcae_worse_than_a_single_gaussian_is_warned_of(data_dir, monkeypatch, tmp_path,
                                                           caplog, gmcae_nll, warned):
    """Found by a user's trial: a GMCAE that modelled its validation patches worse than the
    single Gaussian beside it went by unremarked."""
    import logging

    from kdsb.training import gmcae as gmcae_training

    summary = {"best_val_nll_per_voxel": gmcae_nll, "best_epoch": 1,
               "final_val_nll_per_voxel": gmcae_nll, "single_gaussian_val_nll_per_voxel": 0.99}
    monkeypatch.setattr(gmcae_training, "train_gmcae", lambda *args, **kwargs: summary)
    with caplog.at_level(logging.WARNING):
        assert main(["train-gmcae", str(data_dir), str(tmp_path / "run")]) == 0
    assert ("models the validation patches worse than a single Gaussian" in caplog.text) is warned


@pytest.mark.slow
def test_a_finished_run_resumed_on_other_data_keeps_its_records(trained_run, data_dir,
                                                                tmp_path):
    """Nothing to train: the summary, the spacing record and the options stay those of the
    run (found by a user's check: the summary was measured again on the other patients)."""
    run_dir, _ = trained_run
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(data_dir.glob("*.h5"))[1:]:
        (other / path.name).symlink_to(path)
    names = ("gmcae_summary.json", "gmcae.json", "config.json", "history.csv")
    before = {name: (run_dir / name).read_bytes() for name in names}
    assert main(["-q", "train-gmcae", str(other), str(run_dir), "--resume"]) == 0
    assert {name: (run_dir / name).read_bytes() for name in names} == before
    # The same with its checkpoints deleted to save space (found in review: it trained again).
    import shutil

    copy = shutil.copytree(run_dir, tmp_path / "copy")
    shutil.rmtree(copy / "checkpoints")
    assert main(["-q", "train-gmcae", str(other), str(copy), "--resume"]) == 0
    assert {name: (copy / name).read_bytes() for name in names} == before
    assert not (copy / "checkpoints").exists()


@pytest.mark.slow
def test_reconstructions_resemble_their_patches(trained_run, data_dir):
    from kdsb.models import gmcae

    run_dir, _ = trained_run
    options = GmcaeOptions.from_saved(json.loads((run_dir / "config.json").read_text()))
    patches = validation_patches(sorted(data_dir.glob("*.h5")), options)
    model = keras.saving.load_model(run_dir / "gmcae.keras", safe_mode=True)
    recon = gmcae.reconstruct(model, patches)
    mse = float(np.mean((recon - patches) ** 2))
    # A tiny model after 120 steps: a blurred likeness, clearly better than a constant image.
    assert mse < 0.8 * float(np.var(patches))
    correlations = [
        np.corrcoef(r.ravel(), p.ravel())[0, 1] for r, p in zip(recon, patches, strict=True)
    ]
    assert np.median(correlations) > 0.4


def test_validation_patches_do_not_depend_on_the_core_count(data_dir, monkeypatch):
    """Found in review: the validation set came from the training stream, whose interleave
    follows os.cpu_count(): a run resumed on another machine validated on other patches."""
    options = GmcaeOptions(patch_size=16, batch_size=8, validation_steps=3, patches_per_volume=4)
    paths = sorted(data_dir.glob("*.h5"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two = validation_patches(paths, options)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    sixteen = validation_patches(paths, options)
    assert two.shape == (24, 16, 16, 16, 1) and two.dtype == np.float32
    np.testing.assert_array_equal(two, sixteen)
    other = validation_patches(paths, GmcaeOptions(patch_size=16, batch_size=8,
                                                   validation_steps=3, patches_per_volume=4,
                                                   seed=1))
    assert not np.array_equal(two, other)


@pytest.mark.slow
def test_a_fresh_start_stopped_before_training_is_not_taken_for_the_former_run(
        trained_run, data_dir, tmp_path, monkeypatch):
    """Found in review: a fresh start in a finished run's folder (its checkpoints deleted),
    stopped before training (the patch cache, minutes), then resumed, returned the former
    run's model and summary as this run's."""
    import shutil

    from kdsb.training import gmcae as gmcae_training

    run_dir, _ = trained_run
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    shutil.rmtree(copy / "checkpoints")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gmcae_training, "training_stream", stopped)
    assert main(["-q", "train-gmcae", str(data_dir), str(copy), *TINY, "--epochs", "2"]) == 130
    assert not (copy / "finished.json").exists()
    assert not (copy / "gmcae_summary.json").exists()
    assert not runs.finished_training(copy, 2, None)


def test_a_second_run_into_the_same_run_dir_is_refused(data_dir, tmp_path, capsys):
    """Found in review: two runs on one RUN_DIR (a requeued job beside the one still running)
    deleted each other's temporaries and appended to one history.csv."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with lock_held_elsewhere(run_dir / runs.RUN_LOCK_NAME):
        assert main(["train-gmcae", str(data_dir), str(run_dir), *TINY]) == 2
        assert f"expected no other kdsb train-gmcae writing {run_dir}" in \
            capsys.readouterr().err
        assert sorted(p.name for p in run_dir.iterdir()) == [runs.RUN_LOCK_NAME]


def test_a_seed_out_of_range_is_a_usage_error(data_dir, tmp_path, capsys):
    """Found in review: a traceback from NumPy or Keras, for some only after an attempt."""
    for seed in ("-1", str(2**31)):
        assert main(["train-gmcae", str(data_dir), str(tmp_path / "run"), "--seed", seed]) == 2
        assert f"expected --seed in [0, 2147483648), received {seed}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_a_run_of_another_kind_is_a_usage_error(data_dir, tmp_path, capsys):
    """Found in review: train-classifier --resume on a GMCAE run folder was a TypeError
    traceback; train-gmcae --resume on a classifier's was accepted and clobbered it."""
    run_dir = tmp_path / "run"
    runs.begin(run_dir, GmcaeOptions(width=4), data_dir=data_dir)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,cancer\n" + "".join(f"p{i},{i % 2}\n" for i in range(VOLUMES)))
    argv = ["train-classifier", str(data_dir), str(labels), str(run_dir), "--resume"]
    assert main(argv) == 2
    assert f"expected --resume in the RUN_DIR of a classifier run, received {run_dir}, which " \
        "config.json says is a GMCAE run" in capsys.readouterr().err
    config = json.loads((run_dir / "config.json").read_text())
    del config["run_kind"]  # written before kdsb recorded it: told by its keys
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(argv) == 2
    assert f"expected --resume in the RUN_DIR of a classifier run, received {run_dir}, which " \
        "config.json says is a GMCAE run" in capsys.readouterr().err
    (run_dir / "config.json").write_text(json.dumps({"epochs": 2}))  # damaged: no gmcae
    assert main(argv) == 2
    assert f"expected the options of a classifier run in {run_dir / 'config.json'}, received " \
        in capsys.readouterr().err
    # A classifier's record of before the kind was recorded, resumed by train-gmcae.
    (run_dir / "config.json").write_text(json.dumps({"head": "spp", "gmcae": "g.keras",
                                                     "epochs": 2}))
    saved = (run_dir / "config.json").read_text()
    assert main(["train-gmcae", str(data_dir), str(run_dir), "--resume"]) == 2
    assert f"expected --resume in the RUN_DIR of a GMCAE run, received {run_dir}, which " \
        "config.json says is a classifier run" in capsys.readouterr().err
    assert (run_dir / "config.json").read_text() == saved


@pytest.fixture
def used_run(data_dir, tmp_path) -> Path:
    """A run folder as a killed run leaves it: its options and a checkpoint of epoch 1.

    The options are checked before any checkpoint is read, so the checkpoint may be empty.
    """
    run_dir = tmp_path / "run"
    runs.begin(run_dir, GmcaeOptions(width=4), data_dir=data_dir)
    runs.checkpoint_path(run_dir, 1).parent.mkdir()
    runs.checkpoint_path(run_dir, 1).write_bytes(b"")
    return run_dir


def test_resume_refuses_incompatible_options(used_run, data_dir, capsys):
    saved = (used_run / "config.json").read_text()
    status = main(["train-gmcae", str(data_dir), str(used_run), "--resume", "--width", "8"])
    assert status == 2
    assert (f"expected --width 4 as saved in {used_run / 'config.json'} when resuming, "
            "received 8; only --epochs, --steps-per-epoch, --patience, --min-epochs, --distribute, "
            "--keep-checkpoints may change") in capsys.readouterr().err
    assert (used_run / "config.json").read_text() == saved


def test_resume_refuses_other_patients_or_another_spacing(used_run, data_dir, capsys):
    """Found in review: a resumed run split DATA_DIR anew (volumes added since moved training
    patients into validation) and rewrote gmcae.json with the volumes' spacing of now."""
    from kdsb.data.inputs import save_gmcae_spacing

    saved = (used_run / "config.json").read_text()
    argv = ["train-gmcae", str(data_dir), str(used_run), "--resume"]
    (used_run / "split.json").write_text(json.dumps({"train_ids": ["p0", "p1", "p9"],
                                                     "val_ids": ["p2"]}))
    assert main(argv) == 2
    assert (f"expected {used_run} to resume on the patients it began with, received other "
            "train_ids") in capsys.readouterr().err
    (used_run / "split.json").unlink()
    save_gmcae_spacing(used_run, (2.0, 2.0, 2.0))
    assert main(argv) == 2
    assert (f"expected --resume on volumes of the spacing the run began with, (2.0, 2.0, 2.0) "
            f"mm ({used_run / 'gmcae.json'}), received (1.0, 1.0, 1.0) mm") in \
        capsys.readouterr().err
    assert (used_run / "config.json").read_text() == saved


def test_resume_refuses_another_decoder(used_run, data_dir, capsys):
    from kdsb.training.gmcae import DEFAULT_DECODER

    other = next(d for d in ("transpose", "upsample") if d != DEFAULT_DECODER)
    status = main(["train-gmcae", str(data_dir), str(used_run), "--resume", "--width", "4",
                   "--decoder", other])
    assert status == 2
    assert (f"expected --decoder {DEFAULT_DECODER} as saved in {used_run / 'config.json'} "
            f"when resuming, received {other}") in capsys.readouterr().err


def test_runs_saved_before_the_decoder_option_resume_with_the_transposed_one(used_run, data_dir):
    config = used_run / "config.json"
    saved = json.loads(config.read_text())
    del saved["decoder"]
    config.write_text(json.dumps(saved))
    options, done = runs.resolve_options(GmcaeOptions, {"epochs": 30}, used_run, resume=True,
                                         data_dir=data_dir)
    assert (options.decoder, options.width, options.epochs, done) == ("transpose", 4, 30, 1)
    with pytest.raises(UsageError, match="expected --decoder transpose as saved"):
        runs.resolve_options(GmcaeOptions, {"decoder": "upsample"}, used_run, resume=True,
                             data_dir=data_dir)


def test_decoder_option_reaches_the_model_and_agrees_with_the_models_module():
    from kdsb.models import gmcae, layers
    from kdsb.training import gmcae as training

    assert training.DECODERS == gmcae.DECODERS
    assert training.DEFAULT_DECODER == gmcae.DEFAULT_DECODER == GmcaeOptions().decoder
    assert training.DEFAULT_VARIANCE_FLOOR == layers.DEFAULT_VARIANCE_FLOOR
    for decoder in training.DECODERS:
        options = GmcaeOptions(decoder=decoder, width=2, patch_size=8, mixtures=2)
        assert decoder_of(training._build_model_fn(options)()) == decoder
    with pytest.raises(UsageError, match=r"expected --decoder in \('transpose', 'upsample'\)"):
        GmcaeOptions(decoder="deconv")
    # Refused before anything is written (found in review: it failed inside build_gmcae).
    with pytest.raises(UsageError, match="expected --patch-size a multiple of 8"):
        GmcaeOptions(patch_size=12)


def test_resume_with_the_same_options_object_keeps_them(used_run, data_dir):
    """The library path (the demo's): a whole options object, defaults included."""
    options = GmcaeOptions(width=4)
    assert options.variance_floor > 0
    assert runs.resolve_options(GmcaeOptions, options, used_run, resume=True,
                                data_dir=data_dir) == (options, 1)


def test_existing_run_without_resume_is_a_usage_error(used_run, data_dir, capsys):
    saved = (used_run / "config.json").read_text()
    assert main(["train-gmcae", str(data_dir), str(used_run), "--width", "8"]) == 2
    assert "already holds checkpoints up to epoch 1" in capsys.readouterr().err
    assert (used_run / "config.json").read_text() == saved  # the refused run wrote nothing


def test_corrupt_volume_is_one_line_error_naming_it(data_dir, tmp_path, capsys):
    folder = tmp_path / "volumes"
    folder.mkdir()
    for path in sorted(data_dir.glob("*.h5"))[:2]:
        (folder / path.name).symlink_to(path)
    junk = folder / "junk.h5"
    junk.write_bytes(b"not an HDF5 file" * 64)
    assert main(["train-gmcae", str(folder), str(tmp_path / "run"), *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(junk) in err
    assert "Traceback" not in err and not (tmp_path / "run" / "config.json").exists()


def test_volumes_of_two_spacings_are_one_line_error_naming_one(data_dir, tmp_path, capsys):
    folder = tmp_path / "volumes"
    folder.mkdir()
    for path in sorted(data_dir.glob("*.h5"))[:2]:
        (folder / path.name).symlink_to(path)
    hu, lung = _phantom(np.random.default_rng(1))
    other = volumes.write_volume(volumes.volume_path(folder, "p9"), hu, lung, (2.0, 1.0, 1.0),
                                 (0.0,) * 3)
    assert main(["train-gmcae", str(folder), str(tmp_path / "run"), *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{other}: expected a spacing of (1, 1, 1) mm" in err and "received (2, 1, 1)" in err
    # No model exists yet: the spacing is most volumes' (found by users' checks).
    assert "(that of 2 of the 3 volumes: a run takes one spacing)" in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_missing_or_too_small_data_dir_is_a_usage_error(tmp_path, capsys):
    assert main(["train-gmcae", str(tmp_path / "missing"), str(tmp_path / "run")]) == 2
    assert "received a missing path: " + str(tmp_path / "missing") in capsys.readouterr().err
    one = tmp_path / "one"
    hu, lung = _phantom(np.random.default_rng(1))
    volumes.write_volume(volumes.volume_path(one, "solo"), hu, lung, (1.0,) * 3, (0.0,) * 3)
    assert main(["train-gmcae", str(one), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "at least 2 volume files" in err and "received 1" in err


def test_diverging_run_stops_with_one_line_error(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["-q", "train-gmcae", str(data_dir), str(run_dir), *TINY, "--lr", "1e30",
            "--clipnorm", "0", "--epochs", "3", "--steps-per-epoch", "5"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "became NaN or infinite at epoch" in err and "--lr" in err
    assert len(err.splitlines()) == 1
    assert not (run_dir / "gmcae_summary.json").exists()


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "halves = [tf.config.LogicalDeviceConfiguration()] * 2\n"
        "tf.config.set_logical_device_configuration(cpu, halves)\n"
        "from kdsb.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train-gmcae", str(data_dir), str(run_dir), *TINY,
            "--epochs", "1", "--steps-per-epoch", "3", "--distribute", "mirrored"]
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], env=_subprocess_env(), capture_output=True,
        text=True, timeout=KILL_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mirrored strategy over 2 devices" in result.stderr
    assert _epochs(run_dir) == [0]
    assert (run_dir / "gmcae.keras").is_file()


def _gated_run(argv: list[str], run_dir: Path, gate: Path) -> subprocess.Popen:
    """The `kdsb` command, its patch reader slowed to a large volume's pace and, once the first
    epoch's checkpoint is written, held while the file `gate` exists (a reader held touches
    `gate`.held), started and waited for until a reader is held and a second more has passed:
    readers are in flight and the run cannot end, however late this test saw that checkpoint
    (a run once finished in the second after it on a loaded machine: the Ctrl-C met a run that
    had succeeded, exit 0); the batches read before are used up by then."""
    gate.touch()
    held = gate.with_suffix(".held")
    slow_kdsb = ("import os, signal, sys, time\n"
                 # Ctrl-C as a terminal's command gets it (a suite started in the background of
                 # a shell without job control hands its children SIGINT ignored).
                 "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                 "from kdsb.data import datasets\n"
                 "from kdsb.training import runs\n"
                 "read = datasets.read_patches\n"
                 "def slow_read(*args, **kwargs):\n"
                 "    time.sleep(0.1)\n"
                 f"    while (os.path.exists({str(gate)!r})\n"
                 f"           and runs.last_checkpoint({str(run_dir)!r}) is not None):\n"
                 f"        open({str(held)!r}, 'a').close()\n"
                 "        time.sleep(0.05)\n"
                 "    return read(*args, **kwargs)\n"
                 "datasets.read_patches = slow_read\n"
                 "from kdsb.cli import entry\n"
                 "sys.argv[0] = 'kdsb'\n"
                 "entry()\n")
    process = subprocess.Popen([sys.executable, "-c", slow_kdsb, *argv], env=_subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not held.exists() and process.poll() is None:
        if time.monotonic() > deadline:
            _stop(process)
            pytest.fail("no reader was held: the first epoch never ended")
        time.sleep(0.05)
    time.sleep(1)  # the batches read before the hold used up, the main thread waiting
    return process


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_ctrl_c_ends_the_run_at_once_and_resume_continues_every_epoch_once(data_dir, tmp_path):
    """Ctrl-C in the middle of an epoch (SIGINT to the process group): exit 130 at once (found
    by a user's check: the process printed "interrupted" and hung at exit, a tf.data iterator's
    destructor waiting for its Python readers, which waited for the exiting thread's lock);
    --resume then trains the epochs left, each once, the optimizer state carried on."""
    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    epochs, steps = 3, 20
    argv = ["train-gmcae", str(data_dir), str(run_dir), *TINY, "--batch-size", "4",
            "--epochs", str(epochs), "--steps-per-epoch", str(steps)]
    process = _gated_run(argv, run_dir, gate)
    try:
        assert process.poll() is None, "training ended before Ctrl-C"
        os.killpg(process.pid, signal.SIGINT)
        # The gate opens after Ctrl-C: TensorFlow's main thread, waiting for a batch in C++,
        # takes the interrupt when the batch comes.
        gate.unlink()
        _, err = process.communicate(timeout=20)
    finally:
        _stop(process)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "kdsb train-gmcae: interrupted; what it wrote is whole: rerun it with --resume to go "
        "on where it stopped")
    assert 1 <= runs.last_checkpoint(run_dir)[0] < epochs

    assert main(["-q", *argv, "--resume"]) == 0
    assert _epochs(run_dir) == list(range(epochs))
    assert runs.last_checkpoint(run_dir)[0] == epochs
    resumed = keras.saving.load_model(runs.checkpoint_path(run_dir, epochs), safe_mode=True)
    assert int(resumed.optimizer.iterations) == epochs * steps
    keras.saving.load_model(run_dir / "gmcae.keras", safe_mode=True)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_a_run_whose_batch_never_comes(data_dir, tmp_path):
    """A reader stuck (a network disk): TensorFlow's main thread waits for its batch and never
    takes Ctrl-C; the second stops the run at once (`kdsb.interrupts`), its checkpoint whole."""
    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    argv = ["train-gmcae", str(data_dir), str(run_dir), *TINY, "--batch-size", "4",
            "--epochs", "3", "--steps-per-epoch", "20"]
    process = _gated_run(argv, run_dir, gate)
    try:
        assert process.poll() is None, "training ended before Ctrl-C"
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(1)
        if process.poll() is not None:  # a batch read before the hold was still being used
            pytest.skip("the first Ctrl-C was taken: the main thread was not yet waiting")
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        _stop(process)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "kdsb train-gmcae: interrupted again before it could stop: stopped at once; what it "
        "wrote is whole: rerun it with --resume to go on where it stopped")
    keras.saving.load_model(runs.last_checkpoint(run_dir)[1], safe_mode=True)


@pytest.mark.slow
def test_a_damaged_volume_is_one_line_naming_it(data_dir, tmp_path, capsys):
    """Data damaged inside a volume file (a header that opens over a damaged chunk) is found
    while training reads it, inside a tf.data pipeline: one line naming the file, exit 1 (found
    by a user's check: a TensorFlow traceback, then a hang)."""
    import shutil

    damaged = tmp_path / "volumes"
    shutil.copytree(data_dir, damaged)
    path = volumes.volume_path(damaged, "p1")
    with volumes.open_volume(path) as f:
        chunk = f["hu"].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset: chunk.byte_offset + chunk.size] = bytes(chunk.size)
    path.write_bytes(bytes(data))
    argv = ["train-gmcae", str(damaged), str(tmp_path / "run"), *TINY, "--epochs", "1",
            "--steps-per-epoch", "20"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kdsb train-gmcae: error: {path}: expected readable voxels, "
                              "received damaged data"), err


@pytest.mark.slow
def test_the_patch_cache_is_built_and_gradients_are_clipped(data_dir, tmp_path):
    """`--patch-cache N` end to end (found in review: only its library was tested; its reuse is
    `test_patch_cache`'s): shards under DATA_DIR/.patch_cache, one per training volume; and the
    default --clipnorm 1 reaches the optimizer (0: none)."""
    import shutil

    from kdsb.training.gmcae import _build_model_fn

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    assert main(["-q", "train-gmcae", str(data), str(tmp_path / "run"), *TINY, "--epochs", "1",
                 "--steps-per-epoch", "2", "--patch-cache", "4"]) == 0
    shards = sorted(p.stem for p in (data / ".patch_cache").rglob("*.npy"))
    summary = json.loads((tmp_path / "run" / "gmcae_summary.json").read_text())
    assert len(shards) == summary["train_patients"] and set(shards) < {f"p{i}" for i in
                                                                       range(VOLUMES)}
    model = keras.saving.load_model(tmp_path / "run" / "gmcae.keras", safe_mode=True)
    assert model.optimizer.clipnorm == 1.0
    unclipped = GmcaeOptions(width=4, patch_size=16, mixtures=2, clipnorm=0)
    assert _build_model_fn(unclipped)().optimizer.clipnorm is None


def test_a_patch_cache_that_cannot_be_written_is_refused_before_the_run_begins(
        data_dir, tmp_path, monkeypatch, capsys):
    """Found by a user's trial: on a read-only DATA_DIR, `--patch-cache` failed with a raw
    "[Errno 30] Read-only file system" once the run's records were written. (The tests run as
    root, whom permissions do not stop: the refusal is what a read-only mount answers.)"""
    import tempfile

    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == Path(data_dir).resolve():
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    run = tmp_path / "run"
    assert main(["train-gmcae", str(data_dir), str(run), *TINY, "--patch-cache", "4"]) == 2
    assert "expected a folder for --patch-cache's shards (DATA_DIR/.patch_cache), received a " \
        "path where nothing can be written (Read-only file system)" in capsys.readouterr().err
    assert not (run / "split.json").exists() and not (Path(data_dir) / ".patch_cache").exists()
