"""Tests for kdsb.models.classifier: encoder transfer, freezing, variable-size input, save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kdsb.errors import ModelError, WrongModelError
from kdsb.models.classifier import (
    build_classifier,
    load_classifier,
    load_encoder_from_gmcae,
    load_gmcae,
)
from kdsb.models.gmcae import build_gmcae, encoder_of
from kdsb.models.layers import SpatialPyramidPooling3D

WIDTH = 2
BLOCK_LAYERS = [f"block{b}_conv{i}" for b in (1, 2, 3) for i in (1, 2)]


@pytest.fixture(scope="module")
def gmcae():
    keras.utils.set_random_seed(0)
    return build_gmcae(patch_size=8, width=WIDTH, mixtures=2)


def volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, *shape, 1)).astype("float32")


def test_output_is_probability_for_different_sizes(gmcae):
    model = build_classifier(encoder_of(gmcae), dense_units=8)
    assert model.input.shape == (None, None, None, None, 1)
    assert isinstance(model.get_layer("spp"), SpatialPyramidPooling3D)
    for shape in [(24, 40, 16), (13, 9, 30)]:
        p = model.predict(volume(shape), verbose=0)
        assert p.shape == (1, 1) and p.dtype == np.float32
        assert 0.0 < p[0, 0] < 1.0


@pytest.mark.parametrize("freeze_blocks", [0, 1, 3])
def test_freeze_blocks_freezes_exactly_the_first_blocks(gmcae, freeze_blocks):
    model = build_classifier(encoder_of(gmcae), freeze_blocks=freeze_blocks, dense_units=4)
    features = encoder_of(model)
    frozen = {name for name in BLOCK_LAYERS if not features.get_layer(name).trainable}
    assert frozen == set(BLOCK_LAYERS[: 2 * freeze_blocks])
    assert len(model.non_trainable_weights) == 4 * freeze_blocks  # kernel + bias per conv
    assert all(encoder_of(gmcae).get_layer(name).trainable for name in BLOCK_LAYERS)


@pytest.mark.parametrize("bad", [-1, 4, True, 1.5])
def test_freeze_blocks_validated(gmcae, bad):
    with pytest.raises(ModelError, match="expected freeze_blocks in 0..3"):
        build_classifier(encoder_of(gmcae), freeze_blocks=bad)


def test_weights_are_copied_not_shared(gmcae):
    source = encoder_of(gmcae)
    model = build_classifier(source, dense_units=4)
    copy = encoder_of(model)
    assert copy is not source
    for name in BLOCK_LAYERS:
        pairs = zip(copy.get_layer(name).weights, source.get_layer(name).weights, strict=True)
        for mine, theirs in pairs:
            assert mine is not theirs
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    kernel = copy.get_layer("block1_conv1").kernel
    kernel.assign(kernel.numpy() + 1.0)
    assert not np.allclose(kernel.numpy(), source.get_layer("block1_conv1").kernel.numpy())


def test_load_encoder_from_gmcae_round_trip_and_errors(gmcae, tmp_path):
    path = tmp_path / "gmcae.keras"
    gmcae.save(path)
    loaded = load_encoder_from_gmcae(path)
    probe = volume((16, 8, 8))
    np.testing.assert_array_equal(
        loaded.predict(probe, verbose=0), encoder_of(gmcae).predict(probe, verbose=0)
    )
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder_from_gmcae(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    with pytest.raises(ModelError, match="expected a kdsb GMCAE saved as .keras"):
        load_encoder_from_gmcae(junk)
    other = tmp_path / "other.keras"
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(1)(inputs), name="other").save(other)
    with pytest.raises(ModelError, match="holding model 'other'"):
        load_encoder_from_gmcae(other)
    # One with an encoder and a mixture output but not the rest (found in review: a Keras
    # ValueError naming no file, from the nll head's first use).
    from kdsb.models.gmcae import build_encoder

    patch = keras.Input((8, 8, 8, 1))
    features = keras.layers.Flatten()(build_encoder(width=2)(patch))
    partial = tmp_path / "partial.keras"
    keras.Model(patch, keras.layers.Dense(3, name="mixture_params")(features),
                name="partial").save(partial)
    with pytest.raises(ModelError, match=r"partial.keras' holding model 'partial' without the "
                                         r"layer\(s\) bottleneck_flat, log_priors, means, "
                                         r"variances"):
        load_gmcae(partial)
    # The same read from the archive alone, before TensorFlow starts (a multi-worker run's
    # rule); a file that is no archive is left to the loader.
    from kdsb.models.classifier import check_gmcae_archive

    check_gmcae_archive(path)
    check_gmcae_archive(junk)
    for model, name in ((other, "other"), (partial, "partial")):
        with pytest.raises(WrongModelError, match=f"{model.name}' holding model '{name}' "
                                                  "without the layer"):
            check_gmcae_archive(model)


def test_saved_classifier_round_trip_in_safe_mode(gmcae, tmp_path):
    model = build_classifier(encoder_of(gmcae), freeze_blocks=1, dense_units=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    path = tmp_path / "classifier.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    features = encoder_of(loaded)
    assert not features.get_layer("block1_conv2").trainable
    assert features.get_layer("block2_conv1").trainable
    assert loaded.get_layer("spp").get_config()["levels"] == [1, 2, 4]
    probe = volume((11, 20, 9), seed=2)
    np.testing.assert_array_equal(loaded.predict(probe, verbose=0), model.predict(probe, verbose=0))


def test_log_pooled_feeds_the_head_log1p_of_the_pooled_features(gmcae, tmp_path):
    model = build_classifier(encoder_of(gmcae), dense_units=4, dropout=0.0, log_pooled=True)
    assert model.get_layer("head_dense").input is model.get_layer("log_pooled").output
    x = volume((16, 20, 12), seed=3)
    pooled, logged = keras.Model(model.inputs, [model.get_layer("spp").output,
                                                model.get_layer("log_pooled").output])(x)
    np.testing.assert_allclose(np.asarray(logged), np.log1p(np.asarray(pooled)), rtol=1e-6)
    path = tmp_path / "classifier.keras"
    model.save(path)
    np.testing.assert_allclose(load_classifier(path)(x), model(x), rtol=1e-6)
    plain = build_classifier(encoder_of(gmcae), dense_units=4)
    assert "log_pooled" not in [layer.name for layer in plain.layers]


def test_load_classifier_accepts_a_classifier_and_refuses_others(gmcae, tmp_path):
    model = build_classifier(encoder_of(gmcae), dense_units=4)
    path = tmp_path / "classifier.keras"
    model.save(path)
    probe = volume((8, 12, 8))
    np.testing.assert_array_equal(
        load_classifier(path).predict(probe, verbose=0), model.predict(probe, verbose=0)
    )
    with pytest.raises(ModelError, match="expected a kdsb classifier .keras file.*does not exist"):
        load_classifier(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"PK not a zip")  # Keras would say "File not found"
    with pytest.raises(ModelError, match=r"kdsb classifier saved as .keras \(a zip archive\), "
                                         r"received .*junk.keras', which is not one: cut short"):
        load_classifier(junk)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ModelError, match="which is not one: cut short"):
        load_classifier(cut)
    import zipfile

    with zipfile.ZipFile(junk, "w") as archive:  # a zip, but no Keras model in it
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ModelError, match="kdsb classifier saved as .keras.*does not load"):
        load_classifier(junk)
    # A GMCAE passed by mistake: it loads, but its output is no (batch, 1) probability: the
    # command line's fault (exit status 2).
    wrong = tmp_path / "gmcae.keras"
    gmcae.save(wrong)
    with pytest.raises(WrongModelError, match="expected a kdsb classifier .*holding model"):
        load_classifier(wrong)


def test_the_encoder_computes_in_the_runs_precision_not_the_gmcaes(gmcae):
    """Found in review: the copied encoder kept the GMCAE's saved precision, so a bfloat16
    GMCAE gave a float32 classifier a 16-bit encoder, and a mixed run a float32 encoder."""
    from keras import mixed_precision

    try:
        mixed_precision.set_global_policy("mixed_bfloat16")
        keras.utils.set_random_seed(0)
        bf16_gmcae = build_gmcae(patch_size=8, width=WIDTH, mixtures=2)
        mixed_precision.set_global_policy("float32")
        model = build_classifier(encoder_of(bf16_gmcae), dense_units=4)
        policies = {encoder_of(model).get_layer(name).dtype_policy.name for name in BLOCK_LAYERS}
        assert policies == {"float32"}
        np.testing.assert_array_equal(  # the same weights, in float32
            encoder_of(model).get_layer("block1_conv1").kernel.numpy(),
            encoder_of(bf16_gmcae).get_layer("block1_conv1").kernel.numpy())
        mixed_precision.set_global_policy("mixed_bfloat16")  # a float32 GMCAE, a mixed run
        mixed = build_classifier(encoder_of(gmcae), dense_units=4)
        assert encoder_of(mixed).get_layer("block1_conv1").compute_dtype == "bfloat16"
    finally:
        mixed_precision.set_global_policy("float32")


def test_the_options_choice_sets_agree_with_the_models():
    """classifier_options copies the models' sets so `kdsb --help` imports no Keras."""
    import dataclasses

    from kdsb.models import calibration, layers, mil
    from kdsb.training import classifier_options as options

    assert options.POOLINGS == layers.POOLING_MODES
    assert options.MIL_POOLINGS == mil.POOLINGS
    assert options.CALIBRATIONS == calibration.METHODS
    levels = {f.name: f.default for f in dataclasses.fields(options.ClassifierOptions)}["levels"]
    assert tuple(levels) == layers.DEFAULT_LEVELS
