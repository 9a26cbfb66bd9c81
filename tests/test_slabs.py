"""kdsb.models.slabs: the encoder's first block in z-slabs equals the plain block, forward and
backward, and leaves the saved model as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdsb.errors import ModelError

pytest.importorskip("tensorflow")

WIDTH = 4


def _pair():
    """A width-4 classifier (no dropout, so that training calls draw nothing) and a copy with
    the same weights."""
    import keras

    from kdsb.models.classifier import build_classifier
    from kdsb.models.gmcae import build_encoder

    keras.utils.set_random_seed(0)
    plain = build_classifier(build_encoder(width=WIDTH), dropout=0.0, dense_units=4)
    copy = keras.models.clone_model(plain)
    copy.set_weights(plain.get_weights())
    return plain, copy


def _features_and_gradients(model):
    """A function of a volume x (1, z, y, x, 1), traced once for all shapes (as a training step
    is): (encoder output, p, gradients of the log loss for every trainable weight)."""
    import keras
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, None, None, None, 1), "float32")])
    def step(x):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = keras.losses.binary_crossentropy(tf.ones_like(p), tf.cast(p, "float32"))
        return model.get_layer("encoder")(x), p, tape.gradient(loss, model.trainable_weights)

    def numpy(x):
        features, p, grads = step(x)
        return np.asarray(features, np.float32), float(p[0, 0]), [np.asarray(g) for g in grads]

    return numpy


def test_first_block_in_slabs_equals_the_plain_block():
    """Slabs of 2 output rows: depth 13 (odd: the stride-2 "SAME" padding differs) in slabs of
    2, 2, 2 and 1 rows, 16 (even) in 4 whole slabs, 1 and 3 in one slab; outputs and every
    weight's gradient, in a function traced once for all shapes (as a training step is)."""
    from kdsb.models.slabs import compute_first_block_in_slabs

    plain, tiled = _pair()
    assert compute_first_block_in_slabs(tiled, 4) is tiled
    plain_step, tiled_step = _features_and_gradients(plain), _features_and_gradients(tiled)
    rng = np.random.default_rng(1)
    for shape in [(13, 10, 9), (16, 8, 11), (1, 6, 5), (3, 7, 8)]:
        x = rng.normal(size=(1, *shape, 1)).astype(np.float32)
        expected, (features, p, grads) = plain_step(x), tiled_step(x)
        np.testing.assert_allclose(features, expected[0], rtol=1e-5, atol=1e-6)
        assert p == pytest.approx(expected[1], rel=1e-6)
        assert len(grads) == len(expected[2]) == 16  # 8 layers' kernels and biases
        for got, want in zip(grads, expected[2], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_bfloat16_slabs_compute_in_bfloat16():
    """Under mixed_bfloat16 the output is as close to float32's as bf16 allows (gradients are
    not compared: on a width-4 model bf16 rounding flips ReLUs, and the plain bf16 model's
    gradients differ from float32's by tens of percent as well)."""
    import keras

    from kdsb.models.gmcae import build_encoder
    from kdsb.models.slabs import compute_first_block_in_slabs

    reference = build_encoder(width=WIDTH)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        tiled = build_encoder(width=WIDTH)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    tiled.set_weights(reference.get_weights())
    compute_first_block_in_slabs(tiled, 4)
    x = np.random.default_rng(2).normal(size=(1, 9, 8, 8, 1)).astype(np.float32)
    features = tiled(x)
    assert features.dtype == "bfloat16"
    want = np.asarray(reference(x))
    np.testing.assert_allclose(np.asarray(features, np.float32), want,
                               atol=0.05 * np.abs(want).max())


def test_the_saved_model_is_the_plain_one(tmp_path):
    """Tiling changes how this object computes, not what it saves: the file holds the plain
    architecture and weights and loads computing the plain way. (`train-classifier --tile-z`
    trains through Keras's own step: tests/test_train_classifier.py.)"""
    from kdsb.models.classifier import load_classifier
    from kdsb.models.slabs import compute_first_block_in_slabs

    plain, tiled = _pair()
    compute_first_block_in_slabs(tiled, 4)
    tiled.save(tmp_path / "tiled.keras")
    loaded = load_classifier(tmp_path / "tiled.keras")
    # (JSON: a loaded config holds lists where a built one holds tuples.)
    assert json.dumps(loaded.get_config()) == json.dumps(plain.get_config())
    assert [w.path for w in loaded.weights] == [w.path for w in plain.weights]
    for got, want in zip(loaded.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert "call" in vars(tiled.get_layer("encoder"))
    assert "call" not in vars(loaded.get_layer("encoder"))
    x = np.random.default_rng(3).normal(size=(1, 10, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(tiled(x), plain(x), rtol=1e-5)
    np.testing.assert_array_equal(loaded(x), plain(x))


def test_bad_tile_or_model_is_refused():
    import keras

    from kdsb.models.gmcae import build_encoder
    from kdsb.models.slabs import compute_first_block_in_slabs

    plain, _ = _pair()
    for tile_z in (0, 3, -2, True, 4.0):
        with pytest.raises(ModelError, match=rf"expected tile_z to be an even integer >= 2, "
                                             rf"received {tile_z!r}"):
            compute_first_block_in_slabs(plain, tile_z)
    inputs = keras.Input((None, None, None, 1))
    other = keras.Model(inputs, keras.layers.Conv3D(2, 3, name="conv")(inputs), name="other")
    with pytest.raises(ModelError, match="expected a classifier with a nested 'encoder' model, "
                                         "received model 'other' without it"):
        compute_first_block_in_slabs(other, 4)
    encoder = build_encoder(width=WIDTH)
    x = keras.layers.Conv3D(2, 3, name="extra")(encoder.output)
    longer = keras.Model(encoder.input, x, name="encoder")
    with pytest.raises(ModelError, match=r"expected an encoder of the layers \['block1_conv1'"):
        compute_first_block_in_slabs(longer, 4)
    # The names right, but block 1's stride-2 convolution without padding.
    x = inputs
    for name in [f"block{b}_conv{c}" for b in (1, 2, 3) for c in (1, 2)]:
        padding = "valid" if name == "block1_conv2" else "same"
        x = keras.layers.Conv3D(WIDTH, 3, strides=1 + name.endswith("2"), padding=padding,
                                activation="relu", name=name)(x)
    with pytest.raises(ModelError, match="expected encoder layer 'block1_conv2' as build_encoder "
                                         "makes it"):
        compute_first_block_in_slabs(keras.Model(inputs, x, name="encoder"), 4)
