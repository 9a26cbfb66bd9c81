"""Tests for kdsb.models.layers: ShiftedELU and SpatialPyramidPooling3D against NumPy references."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdsb.models.layers import ShiftedELU, SpatialPyramidPooling3D

LEVELS = (1, 2, 4)


def shifted_elu_reference(x: np.ndarray, floor: float) -> np.ndarray:
    x = x.astype(np.float64)
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1.0 + floor


def spp_reference(volume: np.ndarray, levels, pooling: str) -> np.ndarray:
    """DESIGN.md's rule, bin by bin: bin i of n over L spans [floor(iL/n), ceil((i+1)L/n))."""
    reduce = np.max if pooling == "max" else np.mean
    batch, *sides, channels = volume.shape
    features = []
    for n in levels:
        bounds = [
            [(math.floor(i * side / n), math.ceil((i + 1) * side / n)) for i in range(n)]
            for side in sides
        ]
        level = np.empty((batch, n, n, n, channels))
        for iz, (z0, z1) in enumerate(bounds[0]):
            for iy, (y0, y1) in enumerate(bounds[1]):
                for ix, (x0, x1) in enumerate(bounds[2]):
                    box = volume[:, z0:z1, y0:y1, x0:x1, :]
                    level[:, iz, iy, ix, :] = reduce(box, axis=(1, 2, 3))
        features.append(level.reshape(batch, -1))
    return np.concatenate(features, axis=1)


def test_shifted_elu_matches_numpy_and_stays_positive():
    floor = 1e-3
    x = np.array([-1e4, -100.0, -20.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 50.0], np.float32)
    y = keras.ops.convert_to_numpy(ShiftedELU(floor=floor)(x))
    np.testing.assert_allclose(y, shifted_elu_reference(x, floor), rtol=1e-6, atol=1e-9)
    assert np.all(y >= floor)
    assert y[0] == pytest.approx(floor)


def test_shifted_elu_gradient_finite_and_config_round_trip():
    layer = ShiftedELU(floor=2e-4, name="var")
    x = tf.constant([-1e4, -1.0, 0.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    grad = tape.gradient(y, x).numpy()
    np.testing.assert_allclose(grad, [0.0, math.exp(-1.0), 1.0, 1.0], rtol=1e-6)
    clone = ShiftedELU.from_config(layer.get_config())
    assert clone.floor == 2e-4 and clone.name == "var"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, ShiftedELU) and restored.floor == 2e-4


@pytest.mark.parametrize("floor", [0.0, -1e-3, float("inf"), float("nan")])
def test_shifted_elu_rejects_a_floor_not_finite_and_positive(floor):
    with pytest.raises(ValueError, match="expected a finite floor > 0"):
        ShiftedELU(floor=floor)


@pytest.mark.parametrize("pooling", ["max", "average"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 3, 3), (1, 1, 2, 9, 2), (1, 8, 8, 8, 1)])
def test_spp_matches_numpy_reference(pooling, shape):
    volume = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    layer = SpatialPyramidPooling3D(levels=LEVELS, pooling=pooling)
    out = keras.ops.convert_to_numpy(layer(volume))
    assert out.shape == (shape[0], shape[-1] * (1 + 8 + 64))
    np.testing.assert_allclose(out, spp_reference(volume, LEVELS, pooling), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "average"])
def test_spp_in_tf_function_with_unknown_spatial_sizes(pooling):
    layer = SpatialPyramidPooling3D(levels=(1, 3), pooling=pooling)
    pool = tf.function(
        layer.__call__, input_signature=[tf.TensorSpec((None, None, None, None, 2), tf.float32)]
    )
    rng = np.random.default_rng(3)
    for shape in [(1, 7, 5, 3, 2), (2, 2, 11, 4, 2)]:
        volume = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(
            pool(volume).numpy(), spp_reference(volume, (1, 3), pooling), rtol=1e-5, atol=1e-6
        )


def test_spp_in_functional_model_output_shape_and_gradient():
    inputs = keras.Input((None, None, None, 4))
    model = keras.Model(inputs, SpatialPyramidPooling3D(name="spp")(inputs))
    assert model.output.shape == (None, 4 * 73)
    assert SpatialPyramidPooling3D(levels=(2,)).compute_output_shape((3, 9, 9, 9, 5)) == (3, 40)
    volume = tf.constant(np.random.default_rng(1).normal(size=(1, 6, 5, 4, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(volume)
        total = tf.reduce_sum(model(volume))
    grad = tape.gradient(total, volume).numpy()
    assert np.all(np.isfinite(grad)) and grad.sum() > 0


def test_spp_feature_order_is_level_then_bin_zyx_then_channel():
    volume = np.zeros((1, 2, 2, 2, 2), np.float32)
    volume[0, 1, 0, 1, 1] = 5.0  # bin (z=1, y=0, x=1) of level 2, channel 1
    out = keras.ops.convert_to_numpy(SpatialPyramidPooling3D(levels=(1, 2))(volume))[0]
    expected = np.zeros(2 + 16, np.float32)
    expected[1] = 5.0  # level 1, channel 1
    expected[2 + ((1 * 2 + 0) * 2 + 1) * 2 + 1] = 5.0
    np.testing.assert_array_equal(out, expected)


def test_spp_config_round_trip_and_validation():
    layer = SpatialPyramidPooling3D(levels=(1, 2), pooling="average", name="pyr")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, SpatialPyramidPooling3D)
    assert restored.levels == (1, 2) and restored.pooling == "average" and restored.name == "pyr"
    with pytest.raises(ValueError, match="expected pooling"):
        SpatialPyramidPooling3D(pooling="median")
    with pytest.raises(ValueError, match="expected levels"):
        SpatialPyramidPooling3D(levels=(0, 2))
