"""The GMCAE likelihood as a detector (kdsb.models.nll) and the head that pools it."""

from __future__ import annotations

import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def gmcae():
    import keras

    from kdsb.models.gmcae import build_gmcae

    keras.utils.set_random_seed(0)
    return build_gmcae(patch_size=16, width=2, mixtures=2)


def _numpy_nll(gmcae, patches: np.ndarray) -> np.ndarray:
    """Mixture NLL per voxel of each patch, in float64 from the GMCAE's parameters."""
    from kdsb.models.gmcae import mixture_params

    log_priors, variances, means = (a.astype(np.float64) for a in mixture_params(gmcae, patches))
    t = patches.reshape(len(patches), 1, -1).astype(np.float64)
    c = t.shape[-1]
    log_joint = (log_priors - 0.5 * c * np.log(2 * math.pi * variances)
                 - ((t - means) ** 2).sum(-1) / (2 * variances))
    top = log_joint.max(1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(log_joint - top).sum(1))) / c


@pytest.mark.parametrize("stride, chunk", [(8, 256), (5, 3)])
def test_patch_nll_matches_numpy_on_every_whole_patch(gmcae, stride, chunk, tmp_path):
    import keras

    from kdsb.models.nll import PatchMixtureNLL

    x = np.random.default_rng(1).normal(size=(1, 20, 33, 24, 1)).astype("float32")
    corners = [(z, y, w) for z in range(0, 20 - 15, stride) for y in range(0, 33 - 15, stride)
               for w in range(0, 24 - 15, stride)]
    patches = np.stack([x[0, z:z + 16, y:y + 16, w:w + 16] for z, y, w in corners])
    layer = PatchMixtureNLL(gmcae, stride, chunk=chunk)
    got = np.asarray(layer(x))
    assert got.shape == (1, len(corners), 1)
    np.testing.assert_allclose(got[0, :, 0], _numpy_nll(gmcae, patches), rtol=1e-4, atol=1e-4)
    volume = keras.Input(shape=(None, None, None, 1))
    keras.Model(volume, layer(volume)).save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), got, rtol=1e-6)
    # Two volumes in a graph (shapes unknown when traced): each volume's patches, in order.
    import tensorflow as tf

    pair = np.concatenate([x, x[:, :, ::-1]])
    traced = tf.function(lambda v: layer(v), input_signature=[
        tf.TensorSpec((None, None, None, None, 1), tf.float32)])
    both = np.asarray(traced(pair))
    assert both.shape == (2, len(corners), 1)
    np.testing.assert_allclose(both[0], got[0], rtol=1e-5, atol=1e-5)
    flipped = np.stack([pair[1, z:z + 16, y:y + 16, w:w + 16] for z, y, w in corners])
    np.testing.assert_allclose(both[1, :, 0], _numpy_nll(gmcae, flipped), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected 1 <= stride <= 16"):
        PatchMixtureNLL(gmcae, 17)


def test_an_unusual_patch_scores_higher_under_a_gmcae_trained_on_plain_lung(tmp_path):
    """A GMCAE fitted on noisy parenchyma explains it better than a bright cube in it."""
    import keras

    from kdsb.models.gmcae import build_gmcae
    from kdsb.models.losses import GaussianMixtureNLL
    from kdsb.models.nll import patch_nll_features

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build_gmcae(patch_size=8, width=2, mixtures=2)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=GaussianMixtureNLL(2))
    model.optimizer.build(model.trainable_variables)  # one trace of the step (as runs.fit)
    plain = (-0.6 + 0.05 * rng.normal(size=(256, 8, 8, 8, 1))).astype("float32")
    model.fit(plain, plain, epochs=8, batch_size=32, verbose=0)
    volume = (-0.6 + 0.05 * rng.normal(size=(1, 16, 16, 16, 1))).astype("float32")
    volume[0, 9:14, 9:14, 9:14] = 0.3  # a soft-tissue nodule in the last patch
    nll = np.asarray(patch_nll_features(model, stride=8)(volume))[0, :, 0]
    assert nll.shape == (8,) and int(np.argmax(nll)) == 7
    assert nll[7] > nll[:7].max() + 0.1


def test_a_volume_smaller_than_a_patch_is_a_one_line_error(gmcae, tmp_path):
    """Head nll on a volume with an axis shorter than the patch: the file is named (found in
    review: a TensorFlow reshape error)."""
    from kdsb.data.inputs import VolumeInput
    from kdsb.errors import StoreError
    from kdsb.io import volumes
    from kdsb.training.bags import encode_bags

    gmcae.save(tmp_path / "gmcae.keras")
    size = int(gmcae.input_shape[1])
    path = volumes.write_volume(volumes.volume_path(tmp_path / "data", "thin"),
                                np.full((size - 2, 20, 20), -800, np.int16),
                                np.ones((size - 2, 20, 20), np.uint8), (2.0, 2.0, 2.0),
                                (0.0, 0.0, 0.0))
    with pytest.raises(StoreError, match=rf"thin.h5: expected every axis at least the GMCAE's "
                       rf"patch of {size} voxels \(head nll\), received a network input of "
                       rf"{size - 2}×20×20"):
        encode_bags({"thin": path}, tmp_path / "gmcae.keras", VolumeInput(), [0],
                    tmp_path / "bags", head="nll", block=2)


def test_features_of_a_bfloat16_gmcae_are_scored_in_float32(gmcae):
    """A plain clone kept a bfloat16 GMCAE's 16-bit layers in a float32 run (found in review):
    the copy computes in float32, the same NLL as the float32 GMCAE of the same weights."""
    import keras

    from kdsb.models.gmcae import build_gmcae
    from kdsb.models.nll import patch_nll_features

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        half = build_gmcae(patch_size=16, width=2, mixtures=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    half.set_weights(gmcae.get_weights())
    x = np.random.default_rng(3).normal(size=(1, 16, 24, 16, 1)).astype("float32")
    reference = np.asarray(patch_nll_features(gmcae, stride=8)(x))
    features = patch_nll_features(half, stride=8)
    copy = features.get_layer("patch_nll").gmcae
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    # The nested encoder's convolutions too (found in a later review: a plain clone of the
    # GMCAE rebuilt its encoder from the saved config, in bfloat16).
    encoder = copy.get_layer("encoder")
    assert {layer.dtype_policy.name for layer in encoder.layers} == {"float32"}
    np.testing.assert_allclose(np.asarray(features(x)), reference, rtol=1e-5, atol=1e-5)
    # Built in a mixed-precision run, too: its input is not rounded to 16 bits (found in review).
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = patch_nll_features(half, stride=8)
        np.testing.assert_allclose(np.asarray(mixed(x)), reference, rtol=1e-5, atol=1e-5)
    finally:
        keras.mixed_precision.set_global_policy("float32")
