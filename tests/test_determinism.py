"""One seed, one result: a rerun of the same training on the same machine is bit for bit the same.

Each model is trained twice, into two run folders, with the same options and seed; the saved
weights (and the optimizer state of the checkpoint) must be bitwise identical. For the GMCAE the
second run is a separate process (a true rerun, another Python hash seed; it first loads the
first run's model, as a user's fresh session would), for the classifier it is the same process
(the seeds must be reset, not just set once).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kdsb.io import volumes
from kdsb.training import runs

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 40, 40)  # (z, y, x) voxels of 1 mm
SUBPROCESS_TIMEOUT_S = 180
# A GMCAE small enough to train one short epoch in a few seconds on 2 CPU cores.
GMCAE_ARGS = [
    "--width", "2", "--patch-size", "16", "--mixtures", "2", "--batch-size", "4",
    "--epochs", "1", "--steps-per-epoch", "3", "--validation-steps", "1", "--seed", "11",
]


def _chest(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A tiny chest: soft tissue, two noisy lungs (-850 HU) with bright specks (vessels)."""
    z, y, x = np.indices(SHAPE)
    hu = np.full(SHAPE, 40.0)
    lung = np.zeros(SHAPE, bool)
    for centre_x in (11, 29):
        lung |= ((z - 16) / 14) ** 2 + ((y - 20) / 13) ** 2 + ((x - centre_x) / 8) ** 2 < 1
    hu[lung] = -850
    hu[lung & (rng.random(SHAPE) < 0.05)] = 0
    hu += rng.normal(0, 20, SHAPE)
    return hu.astype(np.int16), lung


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    for i in range(4):
        hu, lung = _chest(rng)
        volumes.write_volume(volumes.volume_path(folder, f"p{i}"), hu, lung, (1.0,) * 3, (0.0,) * 3)
    return folder


def _assert_same_weights(a: Path, b: Path) -> None:
    first = keras.saving.load_model(a, safe_mode=True)
    second = keras.saving.load_model(b, safe_mode=True)
    assert first.optimizer is not None and second.optimizer is not None  # checkpoints hold it
    pairs = [(first.weights, second.weights),
             (first.optimizer.variables, second.optimizer.variables)]
    for left, right in pairs:
        assert len(left) == len(right) > 0
        for u, v in zip(left, right, strict=True):
            # Optimizers are numbered by creation order within a process (adam_1, adam_2).
            assert u.path.split("/")[1:] == v.path.split("/")[1:]
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=u.path)


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / runs.HISTORY_NAME, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_new_process_loads_the_saved_gmcae_and_its_rerun_gives_identical_weights(
    data_dir, tmp_path
):
    """The GMCAE saved by one run, in a fresh process that imported only `kdsb` and `keras`:
    kdsb's Keras objects are registered (the classifier's layers too), the model loads in
    safe mode with its loss and predicts the same; that process then trains it again, from
    the same seed, to the same weights (one process for both: each start of TensorFlow costs
    the suite seconds)."""
    from kdsb.cli import main

    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["-q", "train-gmcae", str(data_dir), str(first), *GMCAE_ARGS]) == 0
    patches = np.random.default_rng(5).uniform(-1, 1, (3, 16, 16, 16, 1)).astype(np.float32)
    np.save(tmp_path / "patches.npy", patches)
    expected = keras.saving.load_model(first / "gmcae.keras").predict(patches, verbose=0)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import sys
        import kdsb, keras
        import numpy as np
        objects = keras.saving.get_custom_objects()
        for name in ("kdsb>ShiftedELU", "kdsb>SpatialPyramidPooling3D"):
            assert name in objects, sorted(objects)
        model = keras.saving.load_model({str(first / "gmcae.keras")!r}, safe_mode=True)
        assert type(model.loss).__name__ == "GaussianMixtureNLL", model.loss
        assert model.loss.mixtures == 2, model.loss.mixtures
        got = model.predict(np.load({str(tmp_path / "patches.npy")!r}), verbose=0)
        # Equal up to float rounding: another process may take other kernels' summation
        # order (1e-10 apart when this test runs alone).
        np.testing.assert_allclose(got, np.load({str(tmp_path / "expected.npy")!r}),
                                   rtol=1e-5, atol=1e-7)
        from kdsb.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONHASHSEED": "123"}
    result = subprocess.run(
        [sys.executable, "-c", script, "-q", "train-gmcae", str(data_dir), str(second),
         *GMCAE_ARGS],
        env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_weights(runs.checkpoint_path(first, 1), runs.checkpoint_path(second, 1))
    _assert_same_weights(first / "gmcae.keras", second / "gmcae.keras")
    assert _history(first) == _history(second)
    summaries = [json.loads((run / "gmcae_summary.json").read_text()) for run in (first, second)]
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_classifier_rerun_gives_identical_weights_and_predictions(
    data_dir, tmp_path
):
    from kdsb.models.gmcae import build_gmcae
    from kdsb.training.classifier import train_classifier
    from kdsb.training.classifier_options import ClassifierOptions

    keras.utils.set_random_seed(0)
    gmcae = tmp_path / "gmcae.keras"
    build_gmcae(patch_size=16, width=2, mixtures=2).save(gmcae)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,cancer\np0,0\np1,1\np2,0\np3,1\n")
    options = ClassifierOptions(gmcae=str(gmcae), epochs=1, val_fraction=0.5, dense_units=4,
                                downscale=2, seed=4, restarts=0)
    results = [train_classifier(data_dir, labels, tmp_path / name, options)
               for name in ("first", "second")]
    _assert_same_weights(runs.checkpoint_path(tmp_path / "first", 1),
                         runs.checkpoint_path(tmp_path / "second", 1))
    assert results[0]["val_predictions"] == results[1]["val_predictions"]
    assert _history(tmp_path / "first") == _history(tmp_path / "second")
