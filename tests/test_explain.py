"""`kdsb explain`: Grad-CAM and occlusion heatmaps on the volume grid, peaks, PNGs, ensembles."""

from __future__ import annotations

import csv
import errno
import logging
import math
import re

import h5py
import numpy as np
import pytest

from kdsb.cli import main
from kdsb.errors import UsageError
from kdsb.evaluation import explain
from kdsb.io import volumes
from kdsb.phantoms.anatomy import make_phantom

PATIENTS = 3


def _bright_blob_classifier(path):
    """A classifier whose answer is known: every convolution a positive local mean, so the
    encoder's features are the smoothed soft tissue left after ReLU (lung and the parenchyma
    fill outside the lungs are negative), and p(cancer) grows with the pyramid's maxima: the
    largest soft-tissue blob in the lungs, here the phantom's large nodule."""
    import keras

    from kdsb.data.inputs import VolumeInput
    from kdsb.models.classifier import build_classifier
    from kdsb.models.gmcae import build_encoder

    keras.utils.set_random_seed(0)
    model = build_classifier(build_encoder(width=4), dense_units=8, dropout=0.0)
    for layer in model.layers[1].layers + model.layers[2:]:
        for weight in layer.weights:
            value = np.zeros(weight.shape) if "bias" in weight.path else \
                np.full(weight.shape, 1.0 / np.prod(weight.shape[:-1]))
            weight.assign(value.astype("float32"))
    model.get_layer("p_cancer").bias.assign(np.array([-2.0], "float32"))
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    VolumeInput().save(path.parent)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(3)
    nodules = {}
    for index in range(PATIENTS):
        phantom = make_phantom(rng, size=128, cancer=True, scale=0.7)
        pid = f"c{index}"
        volumes.write_volume(volumes.volume_path(root / "data", pid), phantom.hu,
                             phantom.lung_mask, phantom.spacing, phantom.origin)
        nodules[pid] = max(phantom.nodules, key=lambda n: n.radius_mm)
    model = _bright_blob_classifier(root / "run" / "classifier.keras")
    return root, model, nodules


def _peaks(out):
    with open(out / "peaks.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _distance_mm(row, nodule):
    peak = np.array([float(row[a]) for a in "zyx"])
    return float(np.linalg.norm(peak - np.array(nodule.center_mm)))


def test_gradcam_peak_lies_on_the_large_nodule_and_files_match_the_volume(cohort, tmp_path):
    root, model, nodules = cohort
    out = tmp_path / "out"
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 0
    peaks = _peaks(out)
    assert sorted(peaks) == sorted(nodules)
    for pid, nodule in nodules.items():
        assert _distance_mm(peaks[pid], nodule) <= nodule.radius_mm + 10.0, pid
        volume = volumes.read_volume(volumes.volume_path(root / "data", pid))
        with h5py.File(out / f"{pid}.h5") as f:
            heat = f["heatmap"][...]
            assert heat.dtype == np.float32 and heat.shape == volume.hu.shape
            np.testing.assert_allclose(f.attrs["spacing"], volume.spacing)
            np.testing.assert_allclose(f.attrs["origin"], volume.origin)
            assert 0 < f.attrs["probability"] < 1 and f.attrs["method"] == "gradcam"
        assert heat.max() == pytest.approx(1.0) and heat.min() >= 0
        assert float(peaks[pid]["value"]) == pytest.approx(heat[volume.lung_mask > 0].max(),
                                                           abs=1e-4)
        assert (out / f"{pid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_ensemble_averages_its_models_maps(cohort, tmp_path):
    """The ensemble's map is the mean of its models' maps, each scaled to a maximum of 1: here
    the same weights reading the volume at half resolution (`downscale` 2), a coarser map."""
    from kdsb.data.inputs import VolumeInput

    root, model, _ = cohort
    coarse = tmp_path / "coarse_model" / "classifier.keras"
    coarse.parent.mkdir()
    coarse.write_bytes(model.read_bytes())
    VolumeInput(downscale=2).save(coarse.parent)
    (tmp_path / "ids.csv").write_text("id\nc1\n")
    maps = {}
    for name, models in (("one", [model]), ("coarse", [coarse]), ("two", [model, coarse])):
        assert main(["explain", str(root / "data"), *map(str, models), str(tmp_path / name),
                     "--ids", str(tmp_path / "ids.csv")]) == 0
        with h5py.File(tmp_path / name / "c1.h5") as f:
            maps[name] = f["heatmap"][...]
            assert len(f.attrs["models"]) == len(models)
    assert maps["one"].max() == pytest.approx(1) and maps["coarse"].max() == pytest.approx(1)
    assert np.abs(maps["one"] - maps["coarse"]).max() > 0.1  # two different maps
    np.testing.assert_allclose(maps["two"], (maps["one"] + maps["coarse"]) / 2, atol=1e-6)
    assert list(_peaks(tmp_path / "two")) == ["c1"]


def test_occlusion_finds_the_nodule_too(cohort, tmp_path, caplog):
    root, model, nodules = cohort
    (tmp_path / "ids.csv").write_text("id\nc0\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="kdsb.evaluation"):
        assert main(["explain", str(root / "data"), str(model), str(out), "--method",
                     "occlusion", "--occlusion-mm", "45", "--stride-mm", "45", "--ids",
                     str(tmp_path / "ids.csv")]) == 0
    # Minutes of silence no more (found by a user's check): the count of forward passes.
    # With the cube as rounded to whole voxels, in mm (found by a user's trial: 5 mm became 4
    # mm without a word).
    found = re.search(r"occlusion: \d+ cubes of (\d+)×(\d+)×(\d+) input voxels \(([\d.]+)×"
                      r"([\d.]+)×([\d.]+) mm, every ([\d.]+)×([\d.]+)×([\d.]+) mm\), one "
                      r"forward pass each", caplog.text)
    assert found, caplog.text
    voxels, cube_mm, step_mm = (np.array(found.groups()[i:i + 3], float) for i in (0, 3, 6))
    assert np.all(np.abs(cube_mm - 45) <= cube_mm / voxels / 2) and np.all(step_mm == cube_mm)
    # And an estimate from the first cube, for a log off a terminal (found in review).
    assert re.search(r"occlusion: \d+\.\d\d s a cube, about (under 1 s|\d+ s|\d+\.\d min) "
                     r"for this patient \(1 model\(s\)\)", caplog.text), caplog.text
    row = _peaks(out)["c0"]
    # Within half a cube of the nodule (found in review: "within a cube", 45 mm, let a peak
    # anywhere in a third of these lungs pass).
    assert _distance_mm(row, nodules["c0"]) <= nodules["c0"].radius_mm + 45.0 / 2
    with h5py.File(out / "c0.h5") as f:
        assert f.attrs["method"] == "occlusion" and f["heatmap"][...].max() == pytest.approx(1)


def test_usage_errors_match_predict(cohort, tmp_path, capsys):
    root, model, _ = cohort
    assert main(["explain", str(root / "data"), str(model)]) == 2
    assert "received only " + str(model) + " after DATA_DIR: a model or OUT_DIR is missing" in (
        capsys.readouterr().err)
    assert main(["explain", str(root / "data"), str(tmp_path / "none.keras"),
                 str(tmp_path / "out")]) == 2
    assert ("expected MODEL.keras or the RUN_DIR of kdsb train-classifier, received a missing "
            "path") in \
        capsys.readouterr().err


def test_an_out_dir_holding_the_volumes_is_refused(cohort, capsys):
    """Heatmaps are <id>.h5 like volumes: OUT_DIR = DATA_DIR must not replace them (found in
    review: every volume became its heatmap, exit 0)."""
    root, model, _ = cohort
    data = root / "data"
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    assert main(["explain", str(data), str(model), str(data)]) == 2
    assert "expected an OUT_DIR apart from the volumes" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before


def test_a_saturated_classifier_still_has_a_map(cohort, tmp_path):
    """p(cancer) = 1.0 in float32: the gradient is taken at the logit, not through the sigmoid
    (found on the demo's classifier: half its confident maps were empty)."""
    import keras

    from kdsb.data.inputs import VolumeInput
    from kdsb.evaluation.gradcam import gradcam
    from kdsb.models.calibration import without_calibration

    root, model_path, _ = cohort
    model = keras.saving.load_model(model_path)
    model.get_layer("p_cancer").bias.assign(np.array([60.0], "float32"))
    x = VolumeInput().read(volumes.volume_path(root / "data", "c0"))
    assert float(without_calibration(model)(x[np.newaxis])[0, 0]) == 1.0
    cam, p, centres = gradcam(model, x)
    assert [stride for stride, _ in centres] == [8, 8, 8]  # three stride-2 blocks
    # The probability reported is the calibrated model's own.
    assert p == pytest.approx(float(model(x[np.newaxis])[0, 0]), rel=1e-5)
    assert cam.max() > 0


def _uniform_encoder():
    """The GMCAE encoder with every kernel a positive mean and no bias: its response to a blob
    is symmetric about the blob."""
    from kdsb.models.gmcae import build_encoder

    encoder = build_encoder(width=2)
    for layer in encoder.layers:
        for weight in layer.weights:
            value = np.zeros(weight.shape) if "bias" in weight.path else \
                np.full(weight.shape, 1.0 / np.prod(weight.shape[:-1]))
            weight.assign(value.astype("float32"))
    return encoder


@pytest.mark.parametrize("extent", [64, 65, 66, 71])
def test_cell_centres_are_where_the_encoder_responds(extent):
    """A blob on the centre `cell_centres` gives cell 3 makes cells 2 and 4 respond alike: the
    centre is the encoder's own, which "same" padding moves by up to 7 voxels with the extent's
    parity at each stage (found in review: the map was stretched over the input instead)."""
    from kdsb.evaluation.gradcam import cell_centres

    encoder = _uniform_encoder()
    stride, offset = cell_centres(encoder, extent)
    assert stride == 8
    assert offset == {64: 7.0, 65: 0.0, 66: 1.0, 71: 6.0}[extent]
    centre = stride * 3 + offset
    z = np.arange(extent)[:, None, None]
    x = np.where(np.abs(z - centre) <= 1.5, 1.0, 0.0) * np.ones((1, 8, 8))
    response = encoder(x[np.newaxis, ..., np.newaxis].astype("float32")).numpy()[0]
    profile = response.sum(axis=(1, 2, 3))
    assert int(np.argmax(profile)) == 3
    assert profile[2] == pytest.approx(profile[4], rel=1e-4)


@pytest.mark.parametrize("downscale", [1, 2])
def test_the_map_is_drawn_between_cell_centres(downscale):
    """Cell 3 of an axis centred on input voxel 8 · 3 + 7: the heatmap peaks there (on the
    volume grid: downscale · (31 + 0.5) - 0.5) and falls linearly to 0 one stride away."""
    from kdsb.evaluation.explain import to_volume_grid

    cam = np.zeros((8, 2, 2), np.float32)
    cam[3] = 1.0
    shape = (64 * downscale + downscale - 1, 4 * downscale, 4 * downscale)
    heatmap = to_volume_grid(cam, shape, downscale, [(8, 7.0), (8, 7.0), (8, 7.0)])
    assert heatmap.shape == shape
    profile = heatmap[:, 0, 0]
    position = (np.arange(shape[0]) + 0.5) / downscale - 0.5  # input voxels
    expected = np.clip(1 - np.abs(position - 31) / 8, 0, 1)
    expected[64 * downscale:] = 0  # beyond the input's extent
    np.testing.assert_allclose(profile, expected, atol=1e-6)


def test_an_ensembles_probability_is_predicts(cohort, tmp_path, monkeypatch):
    """Two models of different confidence: explain reports the p(cancer) predict gives (the
    mean logit), not the mean probability (found in review); the two read each volume once,
    as they read it alike (found in review: once a model)."""
    import keras

    from kdsb.data.inputs import VolumeInput
    from kdsb.evaluation.predict import predict_cohort

    root, model_path, _ = cohort
    other = tmp_path / "other" / "classifier.keras"
    other.parent.mkdir()
    model = keras.saving.load_model(model_path)
    model.get_layer("p_cancer").bias.assign(np.array([3.0], "float32"))
    model.save(other)
    VolumeInput().save(other.parent)
    out = tmp_path / "out"
    reads = []
    read = VolumeInput.read
    monkeypatch.setattr(VolumeInput, "read", lambda self, path: reads.append(path)
                        or read(self, path))
    assert main(["explain", str(root / "data"), str(model_path), str(other), str(out)]) == 0
    assert len(reads) == len(set(reads))  # one read a patient for both models
    monkeypatch.undo()
    predicted = predict_cohort(root / "data", [model_path, other], clip=0.0)
    for pid, p in predicted.items():
        with h5py.File(out / f"{pid}.h5") as f:
            assert float(f.attrs["probability"]) == pytest.approx(p, rel=1e-5)


def test_occlusion_cubes_cover_the_lung_box_to_its_far_end():
    """A lung box 44 voxels long, 24-voxel cubes every 16: the far end's voxels are occluded
    too (found in review: the last cube ended 4 voxels short, leaving them at 0)."""
    from kdsb.evaluation.occlusion import occlusion

    def model(batch, training=False):  # p(cancer) = the mean of the box's last 4 slices
        return np.array([[float(batch[0, 40:44].mean())]])

    x = np.ones((44, 6, 6, 1), np.float32)
    drop, p0 = occlusion(model, x, np.ones((44, 6, 6), bool), fill=0.0, size=(24, 6, 6),
                         stride=(16, 6, 6))
    assert p0 == 1.0
    assert drop[40:44].min() > 0


def test_occlusion_cubes_are_cubes_in_mm_on_anisotropic_volumes(monkeypatch):
    """Found in review: one voxel count from the finest spacing for all axes, so on (2.5, 0.7,
    0.7) mm voxels a 24 mm cube spanned 85 mm along z."""
    import types

    import kdsb.evaluation.explain as explain

    shape, seen = (20, 40, 40), {}

    def recording(model, x, lung, fill, size, stride, voxel_mm, models):
        seen.update(size=tuple(size), stride=tuple(stride), voxel_mm=tuple(voxel_mm))
        seen.setdefault("models", []).append(models)
        return np.zeros(x.shape[:3], np.float32), 0.5

    monkeypatch.setattr(explain, "occlusion", recording)
    volume_input = types.SimpleNamespace(read=lambda path: np.zeros((*shape, 1), np.float32),
                                         downscale=1, outside_hu=-850.0, hu_clip=(-1000.0, 1000.0))
    volume = types.SimpleNamespace(patient_id="p1", hu=np.zeros(shape, np.int16),
                                   lung_mask=np.ones(shape, np.uint8), spacing=(2.5, 0.7, 0.7),
                                   origin=(0.0, 0.0, 0.0))
    explain.explain_patient([object(), object()], [volume_input] * 2, "p1.h5", volume,
                            method="occlusion", occlusion_mm=24.0, stride_mm=16.0)
    # The first model's call estimates the patient's time for both (a user's trial: the
    # estimate counted one model of two).
    assert seen == {"size": (10, 34, 34), "stride": (6, 23, 23), "voxel_mm": (2.5, 0.7, 0.7),
                    "models": [2, 0]}


def test_the_occlusion_peak_is_the_middle_of_the_hottest_block_not_its_corner():
    """Found in review: an occlusion map is flat over the blocks its cubes share, and the first
    voxel at the maximum, the block's low corner, was named the peak, 13 mm from the one voxel
    whose occlusion lowers p here (60³ voxels of 1 mm, 24 mm cubes every 16 mm)."""
    import types

    import kdsb.evaluation.explain as explain

    shape, spot = (60, 60, 60), (44, 35, 30)

    def model(batch, training=False):  # p drops only when the spot is occluded
        return np.array([[0.9 if batch[(0, *spot, 0)] == 1.0 else 0.6]])

    volume_input = types.SimpleNamespace(read=lambda path: np.ones((*shape, 1), np.float32),
                                         downscale=1, outside_hu=-1000.0,
                                         hu_clip=(-1000.0, 400.0))
    volume = types.SimpleNamespace(patient_id="p1", hu=np.zeros(shape, np.int16),
                                   lung_mask=np.ones(shape, np.uint8), spacing=(1.0, 1.0, 1.0),
                                   origin=(0.0, 0.0, 0.0))
    found = explain.explain_patient([model], [volume_input], "p1.h5", volume,
                                    method="occlusion", occlusion_mm=24.0, stride_mm=16.0)
    assert found.heatmap[spot] == 1.0
    assert math.dist(found.peak_index, spot) < 6.0, found.peak_index
    # A map with one hottest voxel: that voxel.
    single = np.zeros((5, 5, 5), np.float32)
    single[1, 2, 3] = 1.0
    assert explain.peak_voxel(single) == (1, 2, 3)


def test_a_cube_over_the_lungs_whole_box_is_warned_of(caplog):
    """Found by a user's trial: a 500 mm cube gave a flat map and only "zero throughout"."""
    from kdsb.evaluation.occlusion import occlusion

    def model(batch, training=False):  # p falls with the mean input: a stand-in classifier
        return np.array([[1.0 - float(np.mean(batch))]])

    x = np.ones((6, 6, 6, 1), np.float32)
    lung = np.zeros((6, 6, 6), bool)
    lung[1:5, 1:5, 1:5] = True
    with caplog.at_level(logging.WARNING, logger="kdsb.evaluation.occlusion"):
        occlusion(model, x, lung, 0.0, (2, 2, 2), (2, 2, 2))
        assert caplog.text == ""
        occlusion(model, x, lung, 0.0, (4, 4, 4), (4, 4, 4))
    assert "the cube covers the lungs' whole box (4×4×4 input voxels): the map can only be " \
        "flat" in caplog.text


def test_occlusion_sizes_must_be_positive_and_finite(cohort, tmp_path, capsys, caplog):
    root, model, _ = cohort
    for size in ("nan", "inf", "0", "-5"):
        argv = ["explain", str(root / "data"), str(model), str(tmp_path / "out"), "--method",
                "occlusion", "--occlusion-mm", size]
        assert main(argv) == 2
        # Only what was given (found by a user's trial: the derived step was quoted too).
        assert (f"expected positive, finite occlusion sizes in mm, received --occlusion-mm "
                f"{float(size):g}\n") in capsys.readouterr().err
    # Steps wider than the cubes would leave lung no cube covers (found in review: zeros).
    assert main(["explain", str(root / "data"), str(model), str(tmp_path / "out"), "--method",
                 "occlusion", "--occlusion-mm", "8", "--stride-mm", "12"]) == 2
    assert "expected --stride-mm at most --occlusion-mm" in capsys.readouterr().err
    # Occlusion sizes with Grad-CAM: said, not silently ignored (found by a user's check).
    with caplog.at_level(logging.WARNING, logger="kdsb.commands.explain"):
        assert main(["explain", str(root / "data"), str(model), str(tmp_path / "cam"),
                     "--occlusion-mm", "8", "--stride-mm", "30"]) == 0  # not checked either
    assert "--method gradcam ignores --occlusion-mm and --stride-mm (occlusion only)" in \
        caplog.text
    # The library's one-patient function resolves and checks the sizes as the cohort's does.
    volume_file = next((root / "data").glob("*.h5"))
    with pytest.raises(UsageError, match="expected --stride-mm at most --occlusion-mm"):
        explain.explain_patient([None], [None], volume_file, None, method="occlusion",
                                occlusion_mm=8.0, stride_mm=12.0)
    # A run folder as OUT_DIR (`explain DATA runA runB`, OUT_DIR left out) is refused before
    # anything is written there (found in review).
    run = model.parent
    before = sorted(run.iterdir())
    assert main(["explain", str(root / "data"), str(model), str(run)]) == 2
    assert (f"expected an OUT_DIR for the heatmaps, received {run}, the run folder of a trained "
            "classifier (was OUT_DIR left out?)") in capsys.readouterr().err
    assert sorted(run.iterdir()) == before


def test_a_heatmap_zero_in_the_lungs_has_no_peak(cohort, tmp_path, monkeypatch, caplog):
    """No region raised p(cancer): peaks.csv says so (nan), with a warning, instead of naming the
    first lung voxel as the peak (found by a user's check)."""
    import kdsb.evaluation.explain as explain

    root, model, _ = cohort
    real_gradcam = explain.gradcam

    def flat_gradcam(*args, **kwargs):
        cam, probability, centres = real_gradcam(*args, **kwargs)
        return np.zeros_like(cam), probability, centres

    monkeypatch.setattr(explain, "gradcam", flat_gradcam)
    (tmp_path / "ids.csv").write_text("id\nc0\n")
    out = tmp_path / "out"
    assert main(["explain", str(root / "data"), str(model), str(out), "--ids",
                 str(tmp_path / "ids.csv")]) == 0
    row = _peaks(out)["c0"]
    assert [row[a] for a in "zyx"] == ["nan"] * 3 and float(row["value"]) == 0.0
    assert "c0: the heatmap is zero throughout the lungs" in caplog.text
    assert (out / "c0.png").stat().st_size > 0


def test_a_map_with_a_nan_cell_fails_its_patient_alone(cohort, tmp_path, monkeypatch, capsys):
    """Found in review: one NaN cell (a gradient overflow with p finite) spread over the whole
    heatmap, which was written as it was and reported "zero throughout the lungs"."""
    import kdsb.evaluation.explain as explain

    root, model, _ = cohort
    real_gradcam = explain.gradcam

    def nan_gradcam(model, x, *args, **kwargs):
        cam, probability, centres = real_gradcam(model, x, *args, **kwargs)
        if x.shape == volumes.read_volume(root / "data" / "c1.h5").hu.shape + (1,):
            cam = cam.copy()
            cam.flat[0] = np.nan
        return cam, probability, centres

    monkeypatch.setattr(explain, "gradcam", nan_gradcam)
    out = tmp_path / "out"
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"failed: \S+/c1\.h5: expected a finite heatmap, received 1 non-finite "
                     r"cell\(s\) of \d+", err)
    assert not (out / "c1.h5").exists() and set(_peaks(out)) == {"c0", "c2"}


def test_a_killed_run_resumes_and_redoes_only_what_is_missing(cohort, tmp_path, monkeypatch):
    from tests.interrupt import Interrupter

    root, model, _ = cohort
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert main(["explain", str(root / "data"), str(model), str(fresh)]) == 0
    explaining = Interrupter(monkeypatch, explain, "explain_patient")
    explaining.next_run(limit=2)
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 130
    assert explaining.calls == 2 and (out / "explain.partial").is_file()
    assert not (out / "peaks.csv").exists()
    # A finished patient's picture gone since: explained again first (killed right after).
    (out / "c0.png").unlink()
    explaining.next_run(limit=1)
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 130
    assert explaining.calls == 1 and (out / "c0.png").is_file()
    # Another finished patient's heatmap gone: explained again, with the one never finished.
    (out / "c1.h5").unlink()
    explaining.next_run()
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 0
    assert explaining.calls == 1 + PATIENTS - 2
    assert (out / "peaks.csv").read_bytes() == (fresh / "peaks.csv").read_bytes()
    for index in range(PATIENTS):
        with h5py.File(out / f"c{index}.h5") as a, h5py.File(fresh / f"c{index}.h5") as b:
            np.testing.assert_array_equal(a["heatmap"][...], b["heatmap"][...])
    assert not (out / "explain.partial").exists()


def test_a_run_resumed_from_another_folder_keeps_its_finished_patients(cohort, tmp_path,
                                                                       monkeypatch):
    """Found in review: the journal named the models as typed, so a killed run resumed with
    the same model by its absolute path was another run, every finished patient redone."""
    from tests.interrupt import Interrupter

    root, model, _ = cohort
    out = tmp_path / "out"
    explaining = Interrupter(monkeypatch, explain, "explain_patient")
    explaining.next_run(limit=1)
    monkeypatch.chdir(model.parent)
    assert main(["explain", str(root / "data"), model.name, str(out)]) == 130
    monkeypatch.chdir(tmp_path)
    explaining.next_run()
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 0
    assert explaining.calls == PATIENTS - 1


def test_heatmaps_of_two_runs_in_one_folder_are_warned_of_and_not_exported(cohort, tmp_path,
                                                                          caplog, capsys):
    """Found in review: explain of one patient with another model into an earlier run's
    folder left the others' heatmaps, and `export --heatmaps` exported both runs' side by
    side, without a word."""
    import shutil

    root, model, _ = cohort
    other = tmp_path / "other_run"
    shutil.copytree(model.parent, other)
    out = tmp_path / "out"
    assert main(["explain", str(root / "data"), str(model), str(out)]) == 0
    (tmp_path / "ids.csv").write_text("id\nc1\n")
    with caplog.at_level(logging.WARNING):
        assert main(["explain", str(root / "data"), str(other / model.name), str(out), "--ids",
                     str(tmp_path / "ids.csv")]) == 0
    assert f"{out} holds heatmaps of 2 explain runs: 2 by gradcam of {model} (c0, c2); 1 by " \
        f"gradcam of {other / model.name} (c1)" in caplog.text
    capsys.readouterr()
    assert main(["export", str(root / "data"), str(tmp_path / "nifti"), "--heatmaps",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert f"expected --heatmaps DIR holding one explain run's heatmaps, received 2 runs' in " \
        f"{out}: 2 by gradcam of {model} (c0, c2); 1 by gradcam of {other / model.name} (c1); " \
        "explain into a folder of its own" in err
    assert not (tmp_path / "nifti").exists() or not any((tmp_path / "nifti").iterdir())
    # One run's patients only: exported.
    (tmp_path / "ids.csv").write_text("id\nc0\nc2\n")
    assert main(["export", str(root / "data"), str(tmp_path / "nifti"), "--heatmaps", str(out),
                 "--ids", str(tmp_path / "ids.csv")]) == 0


def test_a_model_retrained_in_place_is_another_explain_run(cohort, tmp_path, capsys):
    """Found in review: runs were told apart by method and model paths only, so heatmaps of a
    model retrained at the same path were exported beside the former model's. Each heatmap
    names its run by the digest of the run's fingerprint (the models' contents)."""
    import shutil

    import keras

    root, model, _ = cohort
    run = tmp_path / "run"
    shutil.copytree(model.parent, run)
    out = tmp_path / "out"
    assert main(["explain", str(root / "data"), str(run / model.name), str(out)]) == 0
    (tmp_path / "ids.csv").write_text("id\nc1\n")
    argv = ["explain", str(root / "data"), str(run / model.name), str(out), "--ids",
            str(tmp_path / "ids.csv")]
    assert main(argv) == 0  # the same model again: the same run
    assert main(["export", str(root / "data"), str(tmp_path / "nifti"), "--heatmaps",
                 str(out)]) == 0
    retrained = keras.saving.load_model(run / model.name, safe_mode=True, compile=False)
    retrained.get_layer("p_cancer").bias.assign(np.array([-1.0], "float32"))
    retrained.save(run / model.name)
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["export", str(root / "data"), str(tmp_path / "nifti2"), "--heatmaps",
                 str(out)]) == 2
    where = re.escape(str(run / model.name))
    assert re.search(rf"2 by gradcam of {where} \(run [0-9a-f]{{12}}\) \(c0, c2\); 1 by "
                     rf"gradcam of {where} \(run [0-9a-f]{{12}}\) \(c1\)",
                     capsys.readouterr().err)


def test_a_patient_that_fails_fails_alone_and_a_rerun_retries_only_it(cohort, tmp_path,
                                                                       monkeypatch, capsys):
    """Found in review: one damaged volume stopped explain for the whole cohort, every rerun at
    the same patient, and a killed run left an earlier run's peaks.csv beside new heatmaps."""
    from kdsb.errors import StoreError
    from tests.interrupt import Interrupter

    root, model, _ = cohort
    out = tmp_path / "out"
    out.mkdir()
    (out / "peaks.csv").write_text("id,z,y,x,value\nc0,0,0,0,1\n")  # an earlier run's
    real = explain.explain_patient
    explaining = Interrupter(monkeypatch, explain, "explain_patient")
    explaining.next_run(limit=1)
    argv = ["explain", str(root / "data"), str(model), str(out)]
    assert main(argv) == 130
    assert not (out / "peaks.csv").exists()  # a folder without one: an unfinished run

    def damaged_c1(models, inputs, volume_file, volume, **options):
        if volume.patient_id == "c1":
            raise StoreError(f"{volume_file}: expected a readable heatmap input, received a "
                             "damaged chunk")
        return real(models, inputs, volume_file, volume, **options)

    monkeypatch.setattr(explain, "explain_patient", damaged_c1)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.count("kdsb explain: failed:") == 1
    assert f"{root / 'data' / 'c1.h5'}: expected a readable heatmap input" in captured.err
    assert "explained 2 patient(s)" in captured.out and "1 failed" in captured.out
    assert set(_peaks(out)) == {"c0", "c2"} and (out / "explain.partial").is_file()
    monkeypatch.setattr(explain, "explain_patient", real)  # the file mended
    counted = Interrupter(monkeypatch, explain, "explain_patient")
    counted.next_run()
    assert main(argv) == 0
    assert counted.calls == 1  # c1 alone
    assert set(_peaks(out)) == {"c0", "c1", "c2"} and not (out / "explain.partial").exists()


def test_a_damaged_volume_file_fails_alone_and_its_old_heatmap_goes(cohort, tmp_path, capsys):
    """Found in review of the fix: a file whose attributes cannot be read stopped the run in
    the checks before any patient, and a failed patient kept an earlier run's heatmap."""
    import shutil

    root, model, _ = cohort
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(root / "data", data)
    argv = ["explain", str(data), str(model), str(out)]
    assert main(argv) == 0
    (data / "c2.h5").write_bytes((data / "c2.h5").read_bytes()[:4096])  # truncated
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.count("kdsb explain: failed:") == 1 and str(data / "c2.h5") in \
        captured.err
    assert set(_peaks(out)) == {"c0", "c1"}
    assert not (out / "c2.h5").exists() and not (out / "c2.png").exists()
    assert (out / "c0.h5").is_file()
    # OUT_DIR = DATA_DIR, its one patient damaged (no volume to `holds_volume`): refused, the
    # damaged file left as it is (found in review of the fix: removed as an "old heatmap").
    damaged = (data / "c2.h5").read_bytes()
    (tmp_path / "one.csv").write_text("id\nc2\n")
    assert main(["explain", str(data), str(model), str(data), "--ids",
                 str(tmp_path / "one.csv")]) == 2
    assert "expected an OUT_DIR apart from the volumes" in capsys.readouterr().err
    assert (data / "c2.h5").read_bytes() == damaged


def test_a_full_disk_ends_the_run(cohort, tmp_path, monkeypatch, capsys):
    """Found in review of the fix: a full disk failed each patient alone, after its work."""
    root, model, _ = cohort

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(explain, "write_png", no_space)
    assert main(["explain", str(root / "data"), str(model), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "kdsb explain: failed:" not in err


def test_the_png_draws_millimetres_alike_on_both_axes_of_a_view(tmp_path, monkeypatch):
    """Found in review: on a volume of 2 mm slices and 1 mm pixels the coronal and sagittal
    views were squeezed to half their height."""
    from matplotlib.axes import Axes

    from kdsb.preprocessing.qc.overlays import pixel_aspects

    assert pixel_aspects((2.0, 1.0, 0.5)) == {"axial": 2.0, "coronal": 4.0, "sagittal": 2.0}
    shape = (6, 8, 10)
    lung = np.zeros(shape, np.uint8)
    lung[1:5, 2:6, 2:8] = 1
    volume = volumes.Volume("p", np.full(shape, -800, np.int16), lung, (2.0, 1.0, 1.0),
                            (0.0, 0.0, 0.0), {})
    found = explain.Explanation("p", np.zeros(shape, np.float32), 0.5, (3, 4, 5),
                                (6.0, 4.0, 5.0))
    aspects = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, *a, **k: aspects.append(k.get("aspect"))
                        or imshow(ax, *a, **k))
    figures = []
    monkeypatch.setattr(explain, "save_figure", lambda figure, path: figures.append(figure))
    explain.write_png(tmp_path / "p.png", volume, found)
    assert aspects == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # axial, coronal, sagittal: HU and heat
    # The lung's outline lies on its pixels' edges in every view, as the image under it (found
    # in review: the axial one was drawn upside down, the others half a pixel off).
    for ax, (rows, columns) in zip(figures[0].axes, [((2, 6), (2, 8)), ((1, 5), (2, 8)),
                                                     ((1, 5), (2, 6))], strict=True):
        outline = np.concatenate([path.vertices for path in ax.collections[0].get_paths()])
        assert outline[:, 1].min() == pytest.approx(rows[0] - 0.5, abs=0.01)
        assert outline[:, 1].max() == pytest.approx(rows[1] - 0.5, abs=0.01)
        assert outline[:, 0].min() == pytest.approx(columns[0] - 0.5, abs=0.01)
        assert outline[:, 0].max() == pytest.approx(columns[1] - 0.5, abs=0.01)
    # The peak (z, y, x) = (3, 4, 5) is marked in each view's (column, row) (a user's trial).
    marks = [tuple(ax.lines[0].get_xydata()[0]) for ax in figures[0].axes]
    assert marks == [(5, 4), (5, 3), (4, 3)]
    assert "peak (+) at (z, y, x) = (6.0, 4.0, 5.0) mm" in figures[0]._suptitle.get_text()


def test_the_occlusion_estimate_reads_in_seconds_under_a_minute():
    """Found by a user's trial: "about 0.0 min for this patient"."""
    from kdsb.evaluation.occlusion import _duration

    assert [_duration(s) for s in (0.4, 12.2, 59.4, 59.6, 150.0)] == [
        "under 1 s", "12 s", "59 s", "1.0 min", "2.5 min"]
