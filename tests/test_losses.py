"""Tests for kdsb.models.losses against a float64 NumPy/SciPy reference of the mixture NLL."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import logsumexp
from scipy.stats import norm

from kdsb.models.losses import GaussianMixtureNLL, gaussian_mixture_nll, split_mixture_params


def nll_reference(targets, log_priors, variances, means) -> np.ndarray:
    t, a, v, mu = (np.asarray(x, np.float64) for x in (targets, log_priors, variances, means))
    c = t.shape[1]
    sq = np.sum((t[:, None, :] - mu) ** 2, axis=-1)
    comp = a - 0.5 * c * np.log(2 * math.pi * v) - sq / (2 * v)
    return -logsumexp(comp, axis=1) / c


def make_case(rng, batch=3, mixtures=3, voxels=27):
    targets = rng.normal(size=(batch, voxels)).astype(np.float32)
    logits = rng.normal(size=(batch, mixtures))
    log_priors = (logits - logsumexp(logits, axis=1, keepdims=True)).astype(np.float32)
    variances = rng.uniform(0.2, 2.0, size=(batch, mixtures)).astype(np.float32)
    means = (targets[:, None, :] + rng.normal(size=(batch, mixtures, voxels))).astype(np.float32)
    return targets, log_priors, variances, means


def extreme_cases():
    rng = np.random.default_rng(11)
    ordinary = make_case(rng)
    tiny = make_case(rng)
    tiny[2][:] = 1e-6
    tiny[3][:] = tiny[0][:, None, :] + rng.normal(scale=1e-3, size=tiny[3].shape)
    far = make_case(rng)
    far[3][:] += 1e3
    dominant = make_case(rng)
    dominant[1][:] = np.log(np.array([1 - 2e-7, 1e-7, 1e-7]))
    return {"ordinary": ordinary, "tiny_variance": tiny, "far_means": far, "dominant": dominant}


@pytest.mark.parametrize("case", ["ordinary", "tiny_variance", "far_means", "dominant"])
def test_nll_matches_reference_with_finite_gradients(case):
    inputs = [tf.constant(x) for x in extreme_cases()[case]]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        nll = gaussian_mixture_nll(*inputs)
    expected = nll_reference(*extreme_cases()[case])
    assert nll.dtype == tf.float32 and nll.shape == (3,)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(nll.numpy(), expected, rtol=1e-4, atol=1e-4 * scale)
    for grad in tape.gradient(nll, inputs):
        assert np.all(np.isfinite(grad.numpy()))


def test_single_component_reduces_to_gaussian():
    rng = np.random.default_rng(5)
    targets = rng.normal(size=(4, 64)).astype(np.float32)
    means = rng.normal(size=(4, 1, 64)).astype(np.float32)
    variances = rng.uniform(0.1, 3.0, size=(4, 1)).astype(np.float32)
    nll = gaussian_mixture_nll(targets, np.zeros((4, 1), np.float32), variances, means)
    expected = -norm.logpdf(targets, means[:, 0], np.sqrt(variances)).sum(axis=1) / 64
    np.testing.assert_allclose(keras.ops.convert_to_numpy(nll), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs_give_float32_results(dtype):
    args = make_case(np.random.default_rng(2))
    low = [tf.cast(tf.constant(x), dtype) for x in args]
    nll = gaussian_mixture_nll(*low)
    assert nll.dtype == tf.float32
    # Reference on the rounded inputs: the loss itself adds no low-precision error.
    rounded = [x.numpy().astype(np.float64) for x in low]
    np.testing.assert_allclose(nll.numpy(), nll_reference(*rounded), rtol=1e-4)
    np.testing.assert_allclose(nll.numpy(), nll_reference(*args), rtol=0.05)


def test_split_mixture_params_layout():
    mixtures, voxels = 2, 3
    packed = np.arange(2 * mixtures * (2 + voxels), dtype=np.float32).reshape(2, -1)
    log_priors, variances, means = split_mixture_params(packed, mixtures)
    np.testing.assert_array_equal(log_priors, packed[:, :2])
    np.testing.assert_array_equal(variances, packed[:, 2:4])
    assert means.shape == (2, mixtures, voxels)
    np.testing.assert_array_equal(means[:, 1], packed[:, 7:10])
    with pytest.raises(ValueError, match="expected packed mixture parameters"):
        split_mixture_params(np.zeros((2, 9), np.float32), 2)
    for bad in (0, -1, 1.5):  # found in review: 0 was a ZeroDivisionError
        with pytest.raises(ValueError, match=f"with m = {bad}"):
            split_mixture_params(packed, bad)


def test_loss_class_equals_function_on_packed_patches():
    rng = np.random.default_rng(9)
    targets, log_priors, variances, means = make_case(rng, batch=4, mixtures=2, voxels=27)
    patches = targets.reshape(4, 3, 3, 3, 1)
    packed = np.concatenate([log_priors, variances, means.reshape(4, -1)], axis=1)
    loss = GaussianMixtureNLL(mixtures=2)
    per_sample = keras.ops.convert_to_numpy(loss.call(patches, packed))
    expected = nll_reference(targets, log_priors, variances, means)
    np.testing.assert_allclose(per_sample, expected, rtol=1e-5)
    assert float(loss(patches, packed)) == pytest.approx(expected.mean(), rel=1e-5)


def test_loss_config_round_trip():
    loss = GaussianMixtureNLL(mixtures=3, name="mix")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, GaussianMixtureNLL)
    assert restored.mixtures == 3 and restored.name == "mix"
