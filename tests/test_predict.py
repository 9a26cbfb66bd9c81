"""Tests of `kdsb predict`: CSV format, id order, ensembling, TTA, model inputs, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from kdsb.cli import main
from kdsb.data.inputs import VolumeInput
from kdsb.data.patches import apply_symmetry
from kdsb.errors import LabelsError, ModelError, StoreError, UsageError
from kdsb.evaluation.predict import ensemble_probability, predict_cohort, tta_symmetries
from kdsb.io.tables import read_predictions
from kdsb.io.volumes import volume_path, write_volume
from tests.interrupt import Interrupter

IDS = ("c", "a", "b")
SHAPES = ((12, 14, 10), (9, 16, 16), (16, 8, 12))
# Random volumes with an all-lung mask: masking would change nothing, so it is off. The second
# model reads its volumes through another HU clip: each model its own input.
INPUTS = (VolumeInput(spacing_mm=(1, 1, 1), mask_outside_lungs=False),
          VolumeInput(spacing_mm=(1, 1, 1), mask_outside_lungs=False, hu_clip=(-600.0, 0.0)))
# Output biases far apart, so that the mean logit and the mean probability differ (by ~0.09).
BIASES = (3.0, -2.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three tiny volumes of different shapes and two tiny saved classifiers."""
    import keras

    from kdsb.models.classifier import build_classifier
    from kdsb.models.gmcae import build_encoder

    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    data = root / "data"
    for patient_id, shape in zip(IDS, SHAPES, strict=True):
        hu = rng.integers(-1000, 400, shape)
        write_volume(volume_path(data, patient_id), hu, np.ones(shape), (1, 1, 1), (0, 0, 0))
    models = []
    for seed, volume_input, bias in zip((1, 2), INPUTS, BIASES, strict=True):
        keras.utils.set_random_seed(seed)
        model = build_classifier(build_encoder(width=2), dense_units=4, dropout=0.0)
        model.get_layer("p_cancer").bias.assign(np.array([bias], "float32"))
        run = root / f"run{seed}"
        run.mkdir()
        model.save(run / "classifier.keras")
        volume_input.save(run)
        models.append(run / "classifier.keras")
    return data, models


def _reference(models, data, patient_id, symmetries=(0,)):
    """Probability by hand: load each model, feed the volume prepared as it reads it, mean
    logit."""
    import keras

    values = []
    for path in models:
        x = VolumeInput.for_model(path).read(volume_path(data, patient_id))
        model = keras.saving.load_model(path, compile=False)
        for s in symmetries:
            values.append(float(model.predict(apply_symmetry(x, s)[None], verbose=0)[0, 0]))
    return _logit_mean(values)


def _logit_mean(probabilities):
    p = np.asarray(probabilities, dtype=np.float64)
    return float(1.0 / (1.0 + np.exp(-np.mean(np.log(p / (1.0 - p))))))


def test_ensemble_probability_is_the_mean_logit():
    assert ensemble_probability([0.9, 0.5]) == pytest.approx(0.75)  # the arithmetic mean: 0.7
    assert ensemble_probability([0.2]) == pytest.approx(0.2)
    assert ensemble_probability([0.01, 0.3, 0.97]) == pytest.approx(_logit_mean([0.01, 0.3, 0.97]))
    # Members at exactly 0 and 1 (float32 sigmoids get there) are clipped, not infinite.
    assert ensemble_probability([1.0, 0.0]) == pytest.approx(0.5)
    assert ensemble_probability([1.0, 1.0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_predict_csv_sorted_ids_and_ensemble_mean(cohort, tmp_path, capsys):
    data, models = cohort
    out = tmp_path / "sub.csv"
    argv = ["predict", str(data), str(models[0]), str(models[1]), "--out", str(out), "--clip", "0"]
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "id,cancer"
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "b", "c"]
    predicted = read_predictions(out)
    for patient_id in IDS:
        single = [_reference([m], data, patient_id) for m in models]
        assert predicted[patient_id] == pytest.approx(_logit_mean(single), abs=2e-6)
        assert abs(predicted[patient_id] - np.mean(single)) > 0.02  # not the mean probability
    assert "wrote 3 prediction(s)" in capsys.readouterr().out
    # The second model alone differs from a reading of its volumes through the first's input.
    x = INPUTS[0].read(volume_path(data, "a"))
    import keras

    second = keras.saving.load_model(models[1], compile=False)
    assert abs(float(second.predict(x[None], verbose=0)[0, 0])
               - _reference([models[1]], data, "a")) > 1e-4


def test_predictions_that_tell_no_patient_apart_are_warned_of(cohort, caplog):
    """Found by a user's trial: a phantom-trained run gave every real-anatomy patient 0.995
    and predict said nothing."""
    data, models = cohort
    with caplog.at_level("WARNING"):
        predict_cohort(data, [models[0]], clip=0.0)
    assert "tell none of them apart" not in caplog.text
    with caplog.at_level("WARNING"):
        same = predict_cohort(data, [models[0]], clip=0.4999)
    assert np.ptp(list(same.values())) < 1e-3
    assert "every one of the 3 patients scored got p(cancer) within 1e-03 of 0.5 (a --clip " \
           "bound): the predictions tell none of them apart" in caplog.text


@pytest.mark.slow
def test_predict_ids_order_clip_and_tta(cohort, tmp_path):
    data, models = cohort
    ids_csv = tmp_path / "sample_submission.csv"
    ids_csv.write_text("id,cancer\nb,0.5\nc,0.5\n")
    out = tmp_path / "sub.csv"
    argv = ["predict", str(data), str(models[0]), "--out", str(out), "--ids", str(ids_csv),
            "--tta", "--tta-count", "3", "--clip", "0"]
    assert main(argv) == 0
    predicted = read_predictions(out)
    assert list(predicted) == ["b", "c"]
    for patient_id in ("b", "c"):
        expected = _reference([models[0]], data, patient_id, symmetries=(0, 1, 2))
        assert predicted[patient_id] == pytest.approx(expected, abs=2e-6)
    # Clipping: with clip 0.49 every probability lands in [0.49, 0.51]; by default a model sure
    # of cancer (p > 0.99995) gives 0.995.
    clipped = predict_cohort(data, [models[0]], clip=0.49)
    assert all(0.49 <= v <= 0.51 for v in clipped.values())
    sure = tmp_path / "sure" / "classifier.keras"
    _with_bias(models[0], sure, 60.0)
    assert set(predict_cohort(data, [sure]).values()) == {0.995}


def _with_bias(model_path, target, bias):
    """A copy of a saved classifier (and its input record) with another output bias."""
    import shutil

    import keras

    shutil.copytree(model_path.parent, target.parent, dirs_exist_ok=True)
    model = keras.saving.load_model(model_path, compile=False)
    model.get_layer("p_cancer").bias.assign(np.array([bias], "float32"))
    model.save(target)


def test_missing_volume_is_an_error_before_any_work(cohort, tmp_path, capsys):
    data, models = cohort
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("id\na\nzz\n")
    out = tmp_path / "sub.csv"
    # A model path that does not exist would be a usage error; the ids are checked first
    # among data problems, so use real models and expect the id error.
    assert main(["predict", str(data), str(models[0]), "--out", str(out),
                 "--ids", str(ids_csv)]) == 1
    err = capsys.readouterr().err
    assert "expected a volume in" in err and "1 of 2 without one: zz" in err
    assert not out.exists()
    with pytest.raises(LabelsError, match="without one: zz"):
        predict_cohort(data, models, ids=["zz"])


def test_missing_inputs_are_usage_errors_before_any_work(cohort, tmp_path, capsys):
    data, models = cohort
    out = tmp_path / "sub.csv"
    missing = tmp_path / "nope.keras"
    assert main(["predict", str(data), str(models[0]), str(missing), "--out", str(out)]) == 2
    assert (f"expected MODEL.keras or the RUN_DIR of kdsb train-classifier, received a missing "
            f"path: {missing}" in capsys.readouterr().err)
    assert main(["predict", str(data), str(tmp_path), "--out", str(out)]) == 2
    assert "received a folder without a trained classifier" in capsys.readouterr().err
    # A labels CSV where the model goes (found by a user's check: Keras's long "File format
    # not supported … TFSMLayer" message, exit 1).
    labels = tmp_path / "labels.csv"
    labels.write_text("id,cancer\na,1\n")
    assert main(["predict", str(data), str(labels), "--out", str(out)]) == 2
    assert (f"expected MODEL.keras or the RUN_DIR of kdsb train-classifier, received a file that "
            f"is no Keras model (.keras): {labels}") in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nodata"), str(models[0]), "--out", str(out)]) == 2
    assert "expected DATA_DIR, a folder of kdsb volume files (<id>.h5), received a missing path" \
        in capsys.readouterr().err
    assert main(["predict", str(data), str(models[0]), "--out", str(out),
                 "--ids", str(tmp_path / "ids.csv")]) == 2
    assert "expected --ids, a CSV with an id column, received a missing path" \
        in capsys.readouterr().err
    assert main(["predict", str(data), str(models[0]), "--out", str(out), "--tta",
                 "--tta-count", "49"]) == 2
    assert "expected --tta-count in [1, 48], received 49" in capsys.readouterr().err
    # Found in review: an ignored --tta-count, and an OUT_CSV that is a folder (failing after
    # every prediction was made).
    assert main(["predict", str(data), str(models[0]), "--out", str(out), "--tta-count",
                 "4"]) == 2
    assert "expected --tta with --tta-count, received --tta-count 4 alone" in \
        capsys.readouterr().err
    assert main(["predict", str(data), str(models[0]), "--out", str(tmp_path)]) == 2
    assert f"expected --out OUT_CSV, a CSV file to write, received a folder: {tmp_path}" in \
        capsys.readouterr().err
    assert not out.exists()
    # Found by a user's trial: /dev/stdout (a link to a device or pipe) was replaced by the
    # renamed CSV for every process, "-" became a file, a mistyped folder was made, and the
    # --ids file or DATA_DIR's manifest were replaced by the predictions.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "stdout"
    device.symlink_to("/dev/null")
    ids = tmp_path / "ids.csv"
    ids.write_text("id\nc0\n")
    (data / "manifest.csv").write_text("id,status\n")
    for target, message in [
        (fifo, f"received {fifo}, which is not a regular file (a device, pipe or socket)"),
        # Also where /dev/stdout leads to a file (a shell's redirection: found in review).
        (Path("/dev/stdout"), "received /dev/stdout, which is not a regular file"),
        (device, f"received {device}, which is not a regular file"),
        ("-", "received '-': kdsb writes a file, not standard output"),
        (tmp_path / "typo" / "sub.csv", "received a path in a folder that does not exist: "
                                        f"{tmp_path / 'typo'}"),
        (ids, f"expected --out OUT_CSV apart from --ids {ids}, received the same file"),
        (data / "c0.h5", "the name of a volume or model file: the predictions would replace it"),
        (data / "manifest.csv", f"expected --out OUT_CSV apart from {data / 'manifest.csv'}, "
                                "kdsb preprocess's record of DATA_DIR"),
    ]:
        assert main(["predict", str(data), str(models[0]), "--out", str(target), "--ids",
                     str(ids)]) == 2
        assert message in capsys.readouterr().err
    assert Path("/dev/null").is_char_device() and not (tmp_path / "typo").exists()
    assert ids.read_text() == "id\nc0\n" and (data / "manifest.csv").read_text() == "id,status\n"
    (data / "manifest.csv").unlink()
    # The library refuses a missing model too, before looking at the ids.
    with pytest.raises(UsageError, match="received a missing path: .*nope.keras"):
        predict_cohort(data, [models[0], missing], ids=["zz"])


def test_a_model_that_is_no_classifier_is_a_one_line_error(cohort, tmp_path, capsys):
    import keras

    from kdsb.models.gmcae import build_gmcae

    data, _ = cohort
    out = tmp_path / "sub.csv"
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    assert main(["predict", str(data), str(junk), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert ("expected a kdsb classifier saved as .keras (a zip archive), received "
            f"'{junk}', which is not one: cut short, damaged") in err and "Traceback" not in err
    keras.utils.set_random_seed(0)
    gmcae = tmp_path / "gmcae.keras"
    build_gmcae(patch_size=8, width=2, mixtures=2).save(gmcae)
    # A model of the wrong kind is the command line's fault, as a folder holding none.
    assert main(["predict", str(data), str(gmcae), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "expected a kdsb classifier (input (None, None, None, None, 1), output (None, 1))" in err
    assert not out.exists()


def test_a_volume_of_another_spacing_is_refused(cohort, tmp_path, capsys):
    _, models = cohort
    data = tmp_path / "data"
    write_volume(volume_path(data, "coarse"), np.zeros((8, 8, 8)), np.ones((8, 8, 8)),
                 (2, 1, 1), (0, 0, 0))
    out = tmp_path / "sub.csv"
    assert main(["predict", str(data), str(models[0]), "--out", str(out)]) == 1
    assert ("coarse.h5: expected a spacing of (1, 1, 1) mm (the model's training volumes), "
            "received (2, 1, 1) mm") in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(StoreError, match="expected a spacing"):
        predict_cohort(data, [models[0]])


def test_the_spacing_of_every_volume_is_checked_before_any_patient_is_scored(
        cohort, tmp_path, monkeypatch):
    """One volume of another spacing at the end of a cohort fails the command at once, not after
    scoring the rest (found by a user's check)."""
    import kdsb.evaluation.predict as predict

    _, models = cohort
    data = tmp_path / "data"
    write_volume(volume_path(data, "a_good"), np.zeros((8, 8, 8)), np.ones((8, 8, 8)),
                 (1, 1, 1), (0, 0, 0))
    write_volume(volume_path(data, "z_coarse"), np.zeros((8, 8, 8)), np.ones((8, 8, 8)),
                 (2, 1, 1), (0, 0, 0))
    monkeypatch.setattr(predict, "member_probabilities",
                        lambda *a, **k: pytest.fail("a patient was scored"))
    with pytest.raises(StoreError, match="z_coarse.h5: expected a spacing"):
        predict_cohort(data, [models[0]])


def test_a_model_that_gives_nan_fails_naming_the_volume_and_writes_nothing(
        cohort, tmp_path, monkeypatch):
    """Found in review: a NaN probability went through the ensemble and the clip into the
    submission as `nan`, exit 0."""
    import kdsb.evaluation.predict as predict

    data, models = cohort
    monkeypatch.setattr(predict, "member_probabilities",
                        lambda models, *a: [float("nan")] + [0.5] * (len(models) - 1))
    out = tmp_path / "sub.csv"
    out.write_text("id,cancer\nc0,0.3\n")  # an earlier run's: gone too (found in review)
    with pytest.raises(ModelError, match=r"\.h5: expected finite probabilities from the "
                                         r"model\(s\), received \d+ NaN of \d+ \("):
        predict_cohort(data, models[:2], out_csv=out)
    assert not out.exists()


def test_tta_warns_of_a_model_trained_without_augmentation(cohort, tmp_path, caplog):
    """Found in review: --tta applied all 48 symmetries to a --no-augment model unremarked."""
    import shutil

    from kdsb.evaluation.predict import warn_unaugmented

    run = tmp_path / "run"
    shutil.copytree(cohort[1][0].parent, run)
    model = run / "classifier.keras"
    with caplog.at_level(logging.WARNING, logger="kdsb.evaluation.predict"):
        warn_unaugmented([model])  # no config.json: nothing known, nothing said
        (run / "config.json").write_text("{damaged")
        warn_unaugmented([model])  # a damaged one neither (predict needs none)
        (run / "config.json").write_text(json.dumps({"augment": True}))
        warn_unaugmented([model])
        assert caplog.text == ""
        (run / "config.json").write_text(json.dumps({"augment": False}))
        predict_cohort(cohort[0], [model], ids=["a"], tta=True, tta_count=2)
    assert f"--tta: {model} was trained without augmentation (--no-augment" in caplog.text


def test_a_cross_validated_run_missing_a_fold_model_is_refused(cohort, tmp_path):
    """Found in review: a run killed while its folds were calibrated left 1 of 2 fold models,
    which predict RUN_DIR ensembled silently."""
    import shutil

    from kdsb.evaluation.predict import resolve_model_paths

    run = tmp_path / "run"
    (run / "fold_1").mkdir(parents=True)
    shutil.copy(cohort[1][0], run / "fold_1" / "classifier.keras")
    (run / "config.json").write_text(json.dumps({"folds": 2}))
    with pytest.raises(UsageError, match=r"expected the 2 fold models of .*run, received 1: "
                                         r"the run stopped before its folds were all calibrated"):
        resolve_model_paths([run])
    (run / "fold_2").mkdir()
    shutil.copy(cohort[1][1], run / "fold_2" / "classifier.keras")
    assert resolve_model_paths([run]) == [run / "fold_1" / "classifier.keras",
                                          run / "fold_2" / "classifier.keras"]


def test_a_model_named_twice_is_refused(cohort, tmp_path):
    """A fold model named beside its RUN_DIR, or one file twice, would weigh double in the
    ensemble's mean (found in review: accepted silently)."""
    import shutil

    from kdsb.evaluation.predict import resolve_model_paths

    run = tmp_path / "run"
    for fold in (1, 2):
        (run / f"fold_{fold}").mkdir(parents=True)
        shutil.copy(cohort[1][fold - 1], run / f"fold_{fold}" / "classifier.keras")
    (run / "config.json").write_text(json.dumps({"folds": 2}))
    fold_1 = run / "fold_1" / "classifier.keras"
    for named in ([run, fold_1], [fold_1, tmp_path / "run" / ".." / "run" / "fold_1" /
                                  "classifier.keras"]):
        with pytest.raises(UsageError, match=r"expected each model once, received .*fold_1"):
            resolve_model_paths(named)
    assert len(resolve_model_paths([run, cohort[1][0]])) == 3  # another file: fine


def test_tta_symmetries():
    assert tta_symmetries(False) == (0,)
    assert tta_symmetries(True) == tuple(range(48))
    assert tta_symmetries(True, 4) == (0, 1, 2, 3)
    assert tta_symmetries(True, None, (1.0, 1.0, 1.0)) == tuple(range(48))
    assert tta_symmetries(True, 4, (2.5, 1.0, 1.0)) == (0, 1, 2, 3)  # the flips come first
    assert tta_symmetries(True, None, (1.0, 1.0, 2.5)) == (*range(8), *range(16, 24))
    assert tta_symmetries(True, 10, (1.0, 2.5, 1.0)) == (*range(8), 40, 41)
    with pytest.raises(UsageError, match=r"expected --tta-count in \[1, 48\], received 0"):
        tta_symmetries(True, 0)


def test_tta_on_an_anisotropic_grid_keeps_its_spacing(cohort, tmp_path, caplog):
    """Volumes of 1 × 1 × 2 mm: TTA averages the 16 symmetries that never move x (a transpose
    of x and y would squash the anatomy), with a warning that says so."""
    from kdsb.data.patches import CUBE_SYMMETRIES, symmetries_for

    _, models = cohort
    model = tmp_path / "coarse_model" / "classifier.keras"
    _with_bias(models[0], model, 0.5)
    dataclasses.replace(INPUTS[0], spacing_mm=(1.0, 1.0, 2.0)).save(model.parent)
    data = tmp_path / "data"
    rng = np.random.default_rng(4)
    write_volume(volume_path(data, "coarse"), rng.integers(-1000, 400, (12, 12, 8)),
                 np.ones((12, 12, 8)), (1, 1, 2), (0, 0, 0))
    kept = symmetries_for((1.0, 1.0, 2.0))
    assert all(CUBE_SYMMETRIES[s][0][2] == 2 for s in kept) and len(kept) == 16
    with caplog.at_level(logging.INFO):
        predicted = predict_cohort(data, [model], tta=True, clip=0.0)
    assert predicted["coarse"] == pytest.approx(
        _reference([model], data, "coarse", symmetries=kept), abs=2e-6)
    assert "only 16 cube symmetries keep a grid of 1 × 1 × 2 mm" in caplog.text
    # The count said is the count used (found by a user's trial: "48 symmetry(ies) each").
    assert "with 1 model(s), 16 symmetry(ies) each" in caplog.text



@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(cohort, tmp_path, monkeypatch):
    import os

    from kdsb.evaluation import predict

    data, models = cohort
    argv = ["predict", str(data), str(models[0]), str(models[1]), "--out"]
    fresh = tmp_path / "fresh.csv"
    assert main([*argv, str(fresh)]) == 0
    out = tmp_path / "sub.csv"
    journal = tmp_path / "sub.csv.partial"
    # The two models read their volumes otherwise: two calls a patient.
    scoring = Interrupter(monkeypatch, predict, "member_probabilities")
    scoring.next_run(limit=4)
    assert main([*argv, str(out)]) == 130
    assert scoring.calls == 4 and journal.is_file() and not out.exists()
    scoring.next_run()
    assert main([*argv, str(out)]) == 0
    assert scoring.calls == 2  # the third patient only
    assert out.read_bytes() == fresh.read_bytes() and not journal.exists()
    # A journal holds a result only for the volume it was made from: a volume written again
    # since is scored again.
    scoring.next_run(limit=4)
    assert main([*argv, str(out)]) == 130
    first = volume_path(data, "a")
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    scoring.next_run()
    assert main([*argv, str(out)]) == 0
    assert scoring.calls == 4 and out.read_bytes() == fresh.read_bytes()
    # Other options are another run: its journal's results are not taken.
    scoring.next_run(limit=4)
    assert main([*argv, str(out)]) == 130
    scoring.next_run()
    assert main([*argv, str(out), "--tta", "--tta-count", "2"]) == 0
    assert scoring.calls == 6


@pytest.mark.slow
def test_a_journal_made_under_other_symmetries_is_not_taken(cohort, tmp_path, monkeypatch):
    """The turns a patient was averaged over are in its journal entry: a run killed under
    another rule for which symmetries keep a grid (the same count of them) is not mixed in."""
    from kdsb.evaluation import predict

    data, models = cohort
    out = tmp_path / "sub.csv"
    argv = ["predict", str(data), str(models[0]), "--out", str(out), "--tta",
            "--tta-count", "2"]
    fresh = tmp_path / "fresh.csv"
    assert main([*argv[:-4], str(fresh), *argv[-3:]]) == 0
    rule = predict.symmetries_for
    monkeypatch.setattr(predict, "symmetries_for", lambda spacing: tuple(range(47, -1, -1)))
    scoring = Interrupter(monkeypatch, predict, "member_probabilities")
    scoring.next_run(limit=1)
    assert main(argv) == 130
    monkeypatch.setattr(predict, "symmetries_for", rule)
    scoring.next_run()
    assert main(argv) == 0
    assert scoring.calls == len(read_predictions(fresh))  # every patient scored again
    assert out.read_bytes() == fresh.read_bytes()


@pytest.mark.slow
def test_a_journal_of_a_model_changed_since_is_not_taken(cohort, tmp_path, monkeypatch):
    """A model trained again at the same path: the killed run's journal, of the old model's
    probabilities, is discarded (models are fingerprinted by content, not path)."""
    from kdsb.evaluation import predict

    data, models = cohort
    model = tmp_path / "run" / "classifier.keras"
    _with_bias(models[0], model, 3.0)
    out = tmp_path / "sub.csv"
    argv = ["predict", str(data), str(model), "--out", str(out), "--clip", "0"]
    scoring = Interrupter(monkeypatch, predict, "member_probabilities")
    scoring.next_run(limit=2)
    assert main(argv) == 130
    _with_bias(models[0], model, -1.0)
    scoring.next_run()
    assert main(argv) == 0
    assert scoring.calls == 3
    for patient_id, value in read_predictions(out).items():
        assert value == pytest.approx(_reference([model], data, patient_id), abs=2e-6)


def test_damaged_volumes_get_the_fill_value_when_asked(cohort, tmp_path, caplog, capsys):
    """Found by a user's trial: one damaged volume stopped a whole submission, --fill-missing
    or not. With it, a file that cannot be read (its header, or its voxels under a readable
    header) is given the fill value, named in a warning; without it, still an error."""
    import shutil

    data, models = cohort
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    (mine / "cut.h5").write_bytes(b"not an HDF5 file")
    hu = np.random.default_rng(0).integers(-1000, 400, (40, 40, 40))
    write_volume(volume_path(mine, "chunks"), hu, np.ones((40, 40, 40)), (1, 1, 1), (0, 0, 0))
    raw = bytearray((mine / "chunks.h5").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4000] = bytes(4000)  # voxels damaged, header whole
    (mine / "chunks.h5").write_bytes(bytes(raw))
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("id\na\ncut\nchunks\n")
    out = tmp_path / "sub.csv"
    argv = ["predict", str(mine), str(models[0]), "--out", str(out), "--ids", str(ids_csv)]
    assert main(argv) == 1
    assert f"{mine / 'cut.h5'}: expected an HDF5 file" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="kdsb.evaluation.predict"):
        assert main([*argv, "--fill-missing", "0.3"]) == 0
    predicted = read_predictions(out)
    assert predicted["cut"] == 0.3 and predicted["chunks"] == 0.3 and predicted["a"] != 0.3
    assert "1 volume file(s) cannot be read: given 0.3 without a model" in caplog.text
    assert f"{mine / 'chunks.h5'}: expected readable voxels" in caplog.text
    # Without --ids every volume is scored, the damaged ones filled (found by a user's trial:
    # --fill-missing was refused without --ids, and one damaged file stopped the run).
    every = tmp_path / "every.csv"
    assert main(["predict", str(mine), str(models[0]), "--out", str(every), "--fill-missing",
                 "0.3"]) == 0
    scored = read_predictions(every)
    assert set(scored) > set(predicted)  # the cohort's other volumes too
    assert {i: scored[i] for i in predicted} == predicted  # cut and chunks filled with 0.3


def test_a_volume_removed_mid_run_gets_the_fill_value_when_asked(cohort, tmp_path,
                                                                  monkeypatch, caplog, capsys):
    """Found in review: a volume removed (or replaced) after the up-front check stopped a run
    given --fill-missing, its stamp read outside the fill's reach."""
    import shutil

    from kdsb.evaluation import predict as predict_module

    data, models = cohort
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    gone = sorted(mine.glob("*.h5"))[1]
    checked = predict_module.check_volumes

    def check_then_remove(*args, **kwargs):
        checked(*args, **kwargs)
        gone.unlink(missing_ok=True)

    monkeypatch.setattr(predict_module, "check_volumes", check_then_remove)
    argv = ["predict", str(mine), str(models[0]), "--out", str(tmp_path / "p.csv")]
    with caplog.at_level(logging.WARNING, logger="kdsb.evaluation.predict"):
        assert main([*argv, "--fill-missing", "0.3"]) == 0
    assert read_predictions(tmp_path / "p.csv")[gone.stem] == 0.3
    assert f"{gone}: expected a volume file, received No such file or directory: given 0.3" \
        in caplog.text
    shutil.copy(data / gone.name, gone)
    assert main(argv) == 1
    assert str(gone) in capsys.readouterr().err.strip().splitlines()[-1]


def test_running_out_of_memory_names_the_patients_volume(cohort, tmp_path, monkeypatch,
                                                          capsys):
    """Found in review: one large scan that exhausted a GPU stopped the run without a word of
    which it was."""
    from kdsb.evaluation import predict as predict_module

    class ResourceExhaustedError(Exception):  # TensorFlow's, told by its name
        pass

    data, models = cohort
    big = sorted(data.glob("*.h5"))[1]
    scored = predict_module.member_probabilities

    def scoring(models_, x, turns):
        if x.size and scoring.calls == 1:
            raise ResourceExhaustedError("Graph execution error:\n\nOOM when allocating tensor")
        scoring.calls += 1
        return scored(models_, x, turns)

    scoring.calls = 0
    monkeypatch.setattr(predict_module, "member_probabilities", scoring)
    assert main(["predict", str(data), str(models[0]), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kdsb predict: error: out of memory (MemoryError: {big}: OOM when "
                          "allocating tensor): try ") and err.count("\n") == 1


@pytest.mark.slow
def test_ids_without_a_volume_get_the_fill_value_when_asked(cohort, tmp_path, caplog, capsys):
    """A submission must name every patient, also one whose scan failed preprocessing."""
    data, models = cohort
    ids_csv = tmp_path / "sample_submission.csv"
    ids_csv.write_text("id,cancer\nzz,0.5\na,0.5\n")
    out = tmp_path / "sub.csv"
    argv = ["predict", str(data), str(models[0]), "--out", str(out), "--ids", str(ids_csv)]
    assert main(argv) == 1
    assert "1 of 2 without one: zz (--fill-missing P gives them probability P)" in \
        capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="kdsb.evaluation.predict"):
        assert main([*argv, "--fill-missing", "0.26"]) == 0
    predicted = read_predictions(out)
    assert list(predicted) == ["zz", "a"] and predicted["zz"] == 0.26
    assert predicted["a"] == pytest.approx(float(np.clip(_reference([models[0]], data, "a"),
                                                         0.005, 0.995)), abs=2e-6)
    assert "1 of 2 id(s) of" in caplog.text and "given 0.26 without a model (zz)" in caplog.text
    # The value as written, clipped as the others (found in review: the warning said 0).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdsb.evaluation.predict"):
        assert main([*argv, "--fill-missing", "0"]) == 0
    assert read_predictions(out)["zz"] == 0.005 and "given 0.005 without a model" in caplog.text
    assert main([*argv, "--fill-missing", "1.5"]) == 2
