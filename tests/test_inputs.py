"""Tests for kdsb.data.inputs: the classifier's input contract, its file and its steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import block_reduce

from kdsb.data.inputs import (
    INPUT_NAME,
    VolumeInput,
    common_spacing,
    gmcae_spacing_of,
    save_gmcae_spacing,
)
from kdsb.data.patches import normalize_hu
from kdsb.errors import KdsbError, StoreError, UsageError
from kdsb.hu import PARENCHYMA_HU
from kdsb.io.volumes import volume_path, write_volume

SHAPE = (16, 18, 20)


@pytest.fixture
def volume(tmp_path):
    """Soft tissue (40 HU) around a box of lung (-800 HU), a bone spot; 2 × 1 × 1 mm voxels."""
    rng = np.random.default_rng(0)
    hu = 40 + rng.normal(0, 20, SHAPE)
    lung = np.zeros(SHAPE, dtype=bool)
    lung[4:12, 5:13, 6:14] = True
    hu[lung] = -800 + rng.normal(0, 20, lung.sum())
    hu[0, 0, 0] = 3000
    path = write_volume(volume_path(tmp_path, "p"), hu.astype(np.int16), lung, (2, 1, 1),
                        (0, 0, 0))
    return path, hu.astype(np.int16), lung


def test_default_keeps_every_lung_voxel_and_fills_the_rest_with_parenchyma(volume):
    path, hu, lung = volume
    x = VolumeInput().read(path)
    assert x.shape == (*SHAPE, 1) and x.dtype == np.float32
    x = x[..., 0]
    np.testing.assert_array_equal(x[lung], normalize_hu(hu)[lung])
    distance = ndimage.distance_transform_edt(~lung, sampling=(2, 1, 1))
    near, far = distance <= 2.0, distance > 2.0
    np.testing.assert_array_equal(x[near], normalize_hu(hu)[near])
    assert far.sum() > 0 and np.all(x[far] == normalize_hu(np.float32(PARENCHYMA_HU)))


def test_no_mask_normalises_with_the_clip_window(volume):
    path, hu, _ = volume
    x = VolumeInput(mask_outside_lungs=False, hu_clip=(-1000, 400)).read(path)[..., 0]
    np.testing.assert_array_equal(x, normalize_hu(hu, clip=(-1000, 400)))
    assert x[0, 0, 0] == 1.0  # 3000 HU clipped to 400 HU


def test_downscale_is_block_mean_and_masks_in_mm(volume):
    path, hu, lung = volume
    x = VolumeInput(mask_outside_lungs=False, downscale=3).read(path)[..., 0]
    expected = block_reduce(normalize_hu(hu)[:15, :18, :18], (3, 3, 3), np.mean)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)
    masked = VolumeInput(downscale=3, lung_dilation_mm=0).read(path)[..., 0]
    coarse_lung = block_reduce(lung[:15, :18, :18], (3, 3, 3), np.max)
    np.testing.assert_allclose(masked[coarse_lung], expected[coarse_lung], rtol=1e-5)
    assert np.all(masked[~coarse_lung] == normalize_hu(np.float32(PARENCHYMA_HU)))


def test_config_round_trip_and_file_lookup(tmp_path):
    volume_input = VolumeInput(spacing_mm=(2, 1, 1), lung_dilation_mm=5, downscale=2)
    assert VolumeInput.from_config(volume_input.to_config()) == volume_input
    run = tmp_path / "run"
    volume_input.save(run, gmcae="g.keras")
    stored = json.loads((run / INPUT_NAME).read_text())
    assert stored["gmcae"] == "g.keras" and stored["spacing_mm"] == [2.0, 1.0, 1.0]
    assert VolumeInput.for_model(run / "classifier.keras") == volume_input
    assert VolumeInput.for_model(run / "checkpoints" / "epoch_0002.keras") == volume_input
    assert VolumeInput.for_model(run / "fold_2" / "classifier.keras") == volume_input
    assert VolumeInput.for_model(run / "fold_2" / "checkpoints" / "epoch_0002.keras") == \
        volume_input
    # A model copied without it is refused: it would be fed volumes by guess (found in review).
    with pytest.raises(KdsbError, match=r"expected classifier.json beside .*m.keras"):
        VolumeInput.for_model(tmp_path / "elsewhere" / "m.keras")
    # A value that is no number names the file (found in review: a bare ValueError).
    (run / INPUT_NAME).write_text(json.dumps({**stored, "hu_clip": ["x", 1]}))
    with pytest.raises(KdsbError, match=r"classifier.json: could not convert string to float"):
        VolumeInput.for_model(run / "classifier.keras")


def test_a_model_carries_its_input_record(tmp_path, caplog):
    """The record inside the model wins over classifier.json; a model with neither is refused;
    a record without a spacing is warned of (volumes of any spacing pass)."""
    import keras

    from kdsb.models.input_record import input_record_of, with_input_record

    inputs = keras.Input((4, 4, 4, 1))
    base = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling3D()(inputs)))
    carried = VolumeInput(spacing_mm=(2, 2, 2), downscale=2)
    model = with_input_record(base, carried.to_config())
    path = tmp_path / "m.keras"
    model.save(path)
    VolumeInput(spacing_mm=(1, 1, 1)).save(tmp_path)  # another record beside: not the model's
    loaded = keras.saving.load_model(path, compile=False)  # plain Keras, once kdsb is imported
    assert VolumeInput.for_model(path, loaded) == carried
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), base(x), rtol=1e-6)
    # A second record replaces the first, not stacked.
    again = with_input_record(loaded, VolumeInput(spacing_mm=(3, 3, 3)).to_config())
    assert input_record_of(again)["spacing_mm"] == [3.0, 3.0, 3.0]
    assert sum(layer.name == "input_record" for layer in again.layers) == 1
    assert input_record_of(base) is None
    # A calibration map fitted again keeps the record after it, and the record passes float32
    # probabilities under a 16-bit policy, saved and loaded (found in review: cast to bfloat16).
    from kdsb.models.calibration import Calibration, calibration_of, with_calibration

    recalibrated = with_calibration(loaded, Calibration(slope=2.0))
    assert input_record_of(recalibrated) == input_record_of(loaded)
    assert calibration_of(recalibrated).slope == 2.0
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = with_input_record(with_calibration(base, Calibration()), carried.to_config())
        assert mixed.output.dtype == "float32"
        mixed.save(tmp_path / "mixed.keras")
        again = keras.saving.load_model(tmp_path / "mixed.keras", compile=False)
        assert again.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    with pytest.raises(KdsbError, match=r"expected classifier.json beside .*elsewhere"):
        VolumeInput.for_model(tmp_path / "elsewhere" / "m.keras", base)
    old = with_input_record(base, {**carried.to_config(), "spacing_mm": None})
    with caplog.at_level("WARNING", logger="kdsb.data.inputs"):
        assert VolumeInput.for_model(path, old).spacing_mm is None
    assert "records no training spacing: volumes of any spacing are scored" in caplog.text


def test_classifier_json_of_earlier_runs_still_reads(tmp_path):
    """Runs saved before `spacing_mm` and `hu_clip` existed: any spacing, the same clip."""
    (tmp_path / INPUT_NAME).write_text(json.dumps(
        {"downscale": 1, "gmcae": "g.keras", "lung_dilation_mm": 2.0,
         "mask_outside_lungs": True, "outside_hu": -850.0}
    ))
    assert VolumeInput.for_model(tmp_path / "classifier.keras") == VolumeInput()
    (tmp_path / INPUT_NAME).write_text(json.dumps({"downscale": 1}))
    with pytest.raises(KdsbError, match="missing mask_outside_lungs, lung_dilation_mm, "
                                        "outside_hu"):
        VolumeInput.for_model(tmp_path / "classifier.keras")


def test_fit_to_records_the_spacing_and_refuses_another(volume, tmp_path):
    path, hu, lung = volume
    fitted = VolumeInput().fit_to([path])
    assert fitted.spacing_mm == (2.0, 1.0, 1.0)
    other = write_volume(volume_path(tmp_path, "q"), hu, lung, (1, 1, 1), (0, 0, 0))
    with pytest.raises(StoreError, match=r"q.h5: expected a spacing of \(2, 1, 1\) mm \(that of "
                                         r"p.h5, the first volume"):
        VolumeInput().fit_to([path, other])
    with pytest.raises(StoreError, match=r"q.h5: expected a spacing of \(2, 1, 1\) mm \(the "
                                         r"model's training volumes\)"):
        fitted.read(other)
    with pytest.raises(StoreError, match=r"p.h5: expected a volume of at least 17 voxels per "
                                         r"axis for --downscale 17, received shape \(16, 18, 20\)"):
        VolumeInput(downscale=17).fit_to([path])


@pytest.mark.parametrize(("bad", "message"), [
    ({"downscale": 0}, "expected --downscale >= 1, received 0"),
    ({"downscale": 1.5}, "expected --downscale >= 1, received 1.5"),
    ({"lung_dilation_mm": -1.0}, "expected --lung-dilation-mm >= 0, received -1.0"),
    ({"outside_hu": float("nan")}, "expected a finite --outside-hu"),
    ({"hu_clip": (400, -1000)}, "expected an HU clip"),
    ({"spacing_mm": (1, 0, 1)}, "expected a spacing of 3 positive mm"),
])
def test_out_of_range_fields_are_usage_errors(bad, message):
    with pytest.raises(UsageError, match=message):
        VolumeInput(**bad)


def test_common_spacing_names_a_corrupt_file_and_one_of_another_spacing(volume, tmp_path):
    path, hu, lung = volume
    assert common_spacing([path, path]) == (2.0, 1.0, 1.0)
    corrupt = tmp_path / "bad.h5"
    corrupt.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="bad.h5: expected an HDF5 file"):
        common_spacing([path, corrupt])
    other = write_volume(volume_path(tmp_path, "q"), hu, lung, (1, 1, 1), (0, 0, 0))
    with pytest.raises(StoreError, match=r"q.h5: expected a spacing of \(2, 1, 1\) mm"):
        common_spacing([path, other])
    # Most files' spacing is the reference, whichever comes first (found by a user's trial: the
    # odd file out was taken for the reference and a majority file named at fault).
    with pytest.raises(StoreError, match=r"^\S*q.h5: expected a spacing of \(2, 1, 1\) mm \(that "
                                         r"of 2 of the 3 volumes: a run takes one spacing\)"):
        common_spacing([other, path, path])


def test_the_run_subfolders_agree_with_their_owners():
    from kdsb.data.inputs import RUN_SUBFOLDER
    from kdsb.io.run_layout import FOLD_PREFIX
    from kdsb.training.runs import CHECKPOINT_DIR

    assert RUN_SUBFOLDER.match(CHECKPOINT_DIR) and RUN_SUBFOLDER.match(f"{FOLD_PREFIX}12")
    assert not RUN_SUBFOLDER.match("copied")


def test_gmcae_spacing_round_trip_lookup_and_old_runs(tmp_path, caplog):
    save_gmcae_spacing(tmp_path, (2, 1, 1))
    assert gmcae_spacing_of(tmp_path / "gmcae.keras") == (2.0, 1.0, 1.0)
    assert gmcae_spacing_of(tmp_path / "checkpoints" / "epoch_0001.keras") == (2.0, 1.0, 1.0)
    assert gmcae_spacing_of(tmp_path / "elsewhere" / "deeper" / "gmcae.keras") is None
    assert "spacing is not checked" in caplog.text
    # A model copied without its record into a folder beside another model's record: not that
    # model's spacing (found by a user's check).
    caplog.clear()
    assert gmcae_spacing_of(tmp_path / "copied" / "gmcae.keras") is None
    assert "spacing is not checked" in caplog.text
    (tmp_path / "gmcae.json").write_text('{"spacing_mm": [1, 0]}')
    with pytest.raises(KdsbError, match="gmcae.json: expected JSON with spacing_mm"):
        gmcae_spacing_of(tmp_path / "gmcae.keras")
