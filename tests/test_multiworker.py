"""`--distribute multiworker`: two local worker processes (TF_CONFIG on two localhost ports)
resume one GMCAE and train one classifier on tiny volumes; the chief alone writes RUN_DIR."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdsb.errors import UsageError
from kdsb.io.volumes import volume_path, write_volume
from kdsb.training import runs

keras = pytest.importorskip("keras")

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 16)  # (z, y, x) voxels of 1 mm
PATIENTS = 8
WORKERS = 2
TIMEOUT_S = 240
GMCAE_TINY = ["--width", "2", "--patch-size", "16", "--mixtures", "2", "--batch-size", "4",
              "--patches-per-volume", "2", "--validation-steps", "1", "--steps-per-epoch", "2"]
CLASSIFIER_TINY = ["--batch-size", "2", "--dense-units", "2", "--levels", "1", "--val-fraction",
                   "0.25", "--calibration", "none"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Eight 16³ volumes (positives hold a bright cube), labels.csv and a tiny saved GMCAE."""
    from kdsb.models.gmcae import build_gmcae

    root = tmp_path_factory.mktemp("multiworker")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(PATIENTS):
        hu = rng.normal(-800, 50, SHAPE)
        if i % 2:
            hu[4:10, 4:10, 4:10] = 40
        write_volume(volume_path(root / "data", f"p{i}"), hu, np.ones(SHAPE), (1, 1, 1),
                     (0, 0, 0))
        rows.append(f"p{i},{i % 2}\n")
    (root / "labels.csv").write_text("id,cancer\n" + "".join(rows))
    keras.utils.set_random_seed(0)
    build_gmcae(patch_size=16, width=2, mixtures=2).save(root / "gmcae.keras")
    return root


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    except OSError as error:
        pytest.skip(f"cannot bind localhost ports for the workers: {error}")
    finally:
        for s in sockets:
            s.close()


def _run_workers(argv: list[str], temp_root: Path) -> list[subprocess.CompletedProcess]:
    """Run `python -m kdsb -q ARGV --distribute multiworker` as two workers; each gets its own
    TMPDIR (under `temp_root`) so the test can see what it leaves there."""
    ports = _free_ports(WORKERS)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    processes = []
    for index in range(WORKERS):
        temp = temp_root / f"worker{index}"
        temp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
               "TMPDIR": str(temp),
               runs.TF_CONFIG: json.dumps({"cluster": cluster,
                                           "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "kdsb", "-q", *argv, "--distribute", "multiworker"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index, result in enumerate(results):
        assert result.returncode == 0, f"worker {index}: {result.stderr[-3000:]}"
    assert "worker done: the chief writes" in results[1].stdout
    for index in range(WORKERS):  # the non-chief's temporary run folder is gone
        assert list((temp_root / f"worker{index}").iterdir()) == []
    return results


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()
            and runs.TENSORBOARD_DIR not in p.relative_to(run_dir).parts}


def _epochs(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in runs.read_history(run_dir / runs.HISTORY_NAME)]


@pytest.mark.slow
def test_two_workers_resume_a_gmcae_and_the_chief_alone_writes(cohort, tmp_path):
    """Epoch 1 trained on one process (here), epoch 2 by two workers resuming from its
    checkpoint (each worker loads it from RUN_DIR; a second two-worker launch would cost half a
    minute more of the suite)."""
    from kdsb.cli import main

    run_dir = tmp_path / "run"
    argv = ["train-gmcae", str(cohort / "data"), str(run_dir), *GMCAE_TINY]
    assert main(["-q", *argv, "--epochs", "1"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["distribute"] == "none"
    for name in ("gmcae.keras", "gmcae_summary.json", "loss.png", "reconstructions.png"):
        (run_dir / name).unlink()  # the chief writes them again
    _run_workers([*argv, "--epochs", "2", "--resume"], tmp_path / "temp")
    assert _files(run_dir) == {
        "config.json", "history.csv", "checkpoints/epoch_0001.keras",
        "checkpoints/epoch_0002.keras", "gmcae.keras", "gmcae_summary.json", "gmcae.json",
        "loss.png", "reconstructions.png", "finished.json", "split.json", "volumes.json",
    }
    assert json.loads((run_dir / "config.json").read_text())["distribute"] == "multiworker"
    assert _epochs(run_dir) == [0, 1]
    assert json.loads((run_dir / "gmcae_summary.json").read_text())["epochs_completed"] == 2
    model = keras.saving.load_model(runs.checkpoint_path(run_dir, 2), safe_mode=True)
    assert int(model.optimizer.iterations) == 2 * 2  # both epochs of 2 steps, each synchronous


@pytest.mark.slow
def test_two_workers_train_a_classifier_and_the_chief_alone_writes(cohort, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train-classifier", str(cohort / "data"), str(cohort / "labels.csv"), str(run_dir),
            "--gmcae", str(cohort / "gmcae.keras"), *CLASSIFIER_TINY]
    # With the weights' moving average too: it trains and is saved under multiworker.
    results = _run_workers([*argv, "--epochs", "1", "--ema-momentum", "0.9"], tmp_path / "temp")
    assert "validation (no calibration map)" in results[0].stdout  # 2 patients: too few
    assert _files(run_dir) == {
        "config.json", "classifier.json", "history.csv", "checkpoints/epoch_0001.keras",
        "uncalibrated.keras", "classifier.keras", "metrics.json", "split.json", "finished.json",
        "volumes.json",
    }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"], metrics["epochs_run"]) == (6, 2, 1)
    assert _epochs(run_dir) == [0]
    model = keras.saving.load_model(runs.checkpoint_path(run_dir, 1), safe_mode=True)
    # 6 training patients, one volume per worker and step: 3 synchronous steps per epoch.
    assert int(model.optimizer.iterations) == 3
    assert model.optimizer.use_ema and metrics["options"]["ema_momentum"] == 0.9


def test_tf_config_missing_or_malformed_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="expected the TF_CONFIG environment variable"):
        runs.read_tf_config({})
    for text in ("not json", '{"cluster": {}}', '{"cluster": {"worker": ["a:1"]}, "task": '
                 '{"type": "worker", "index": 1}}', '{"cluster": {"worker": ["a:1"]}, "task": '
                 '{"type": "ps", "index": 0}}'):
        with pytest.raises(UsageError, match="expected TF_CONFIG as JSON"):
            runs.read_tf_config({"TF_CONFIG": text})


def test_commands_refuse_multiworker_without_tf_config_before_writing(cohort, tmp_path,
                                                                      monkeypatch, capsys):
    from kdsb.cli import main

    monkeypatch.delenv(runs.TF_CONFIG, raising=False)
    run_dir = tmp_path / "run"
    for argv in (["train-gmcae", str(cohort / "data"), str(run_dir)],
                 ["train-classifier", str(cohort / "data"), str(cohort / "labels.csv"),
                  str(run_dir), "--gmcae", str(cohort / "gmcae.keras")]):
        assert main([*argv, "--distribute", "multiworker"]) == 2
        err = capsys.readouterr().err.strip()
        assert "expected the TF_CONFIG environment variable" in err and "\n" not in err
    assert not run_dir.exists()


def test_classifier_multiworker_needs_one_volume_per_worker_and_the_spp_head(cohort, tmp_path,
                                                                             monkeypatch, capsys):
    from kdsb.cli import main
    from kdsb.training.classifier_options import ClassifierOptions

    monkeypatch.setenv(runs.TF_CONFIG, json.dumps(
        {"cluster": {"worker": ["localhost:1", "localhost:2"]},
         "task": {"type": "worker", "index": 0}}))
    argv = ["train-classifier", str(cohort / "data"), str(cohort / "labels.csv"),
            str(tmp_path / "run"), "--gmcae", str(cohort / "gmcae.keras"),
            "--distribute", "multiworker"]
    assert main([*argv, "--batch-size", "1"]) == 2
    assert "expected --batch-size 2 with --distribute multiworker over 2 workers" in (
        capsys.readouterr().err)
    with pytest.raises(UsageError, match="expected --head spp with --distribute multiworker"):
        ClassifierOptions(gmcae=str(cohort / "gmcae.keras"), distribute="multiworker",
                          head="mil")


def test_tf_config_places_the_chief_first():
    two = {"worker": ["a:1", "b:1"]}
    assert runs.read_tf_config({"TF_CONFIG": json.dumps(
        {"cluster": two, "task": {"type": "worker", "index": 1}})}) == runs.Worker(1, 2)
    with_chief = {"chief": ["c:1"], **two}
    chief = runs.read_tf_config({"TF_CONFIG": json.dumps(
        {"cluster": with_chief, "task": {"type": "chief", "index": 0}})})
    assert chief == runs.Worker(0, 3) and chief.chief
    other = runs.read_tf_config({"TF_CONFIG": json.dumps(
        {"cluster": with_chief, "task": {"type": "worker", "index": 0}})})
    assert other == runs.Worker(1, 3) and not other.chief
    assert other.seed(5) != chief.seed(5) == 5
