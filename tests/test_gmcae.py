"""Tests for kdsb.models.gmcae: architecture, packed output, save/load, training, reconstruction."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from kdsb.errors import ModelError
from kdsb.models.gmcae import (
    DECODERS,
    DOWNSAMPLING,
    build_gmcae,
    encoder_of,
    mixture_nll_of_single_gaussian,
    mixture_params,
    reconstruct,
)
from kdsb.models.layers import ShiftedELU
from kdsb.models.losses import GaussianMixtureNLL

PATCH, WIDTH, MIXTURES, FLOOR = 8, 2, 3, 1e-3
VOXELS = PATCH**3


@pytest.fixture(scope="module")
def gmcae():
    keras.utils.set_random_seed(0)
    return build_gmcae(patch_size=PATCH, width=WIDTH, mixtures=MIXTURES, variance_floor=FLOOR)


def decoder_of(model: keras.Model) -> str:
    """Which of `DECODERS` a GMCAE (built or loaded) has, read from its "means" layer."""
    means = model.get_layer("means")
    return "transpose" if isinstance(means, keras.layers.Conv3DTranspose) else "upsample"


def random_patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, PATCH, PATCH, PATCH, 1)).astype("float32")


def test_packed_output_shape_and_layout(gmcae):
    assert gmcae.output.shape == (None, MIXTURES * (2 + VOXELS))
    assert gmcae.input.shape == (None, PATCH, PATCH, PATCH, 1)
    log_priors, variances, means = mixture_params(gmcae, random_patches(5))
    assert log_priors.shape == (5, MIXTURES) and variances.shape == (5, MIXTURES)
    assert means.shape == (5, MIXTURES, VOXELS)
    np.testing.assert_allclose(logsumexp(log_priors, axis=1), 0.0, atol=1e-5)
    assert np.all(variances >= FLOOR * (1 - 1e-6))
    # Component k's mean is output channel k of the "means" layer, flattened in (z, y, x) order.
    means_layer = keras.Model(gmcae.input, gmcae.get_layer("means").output)
    channels = means_layer.predict(random_patches(5), verbose=0)
    np.testing.assert_allclose(means[:, 1], channels[..., 1].reshape(5, -1), rtol=1e-6)


def test_encoder_shapes_and_stable_layer_names(gmcae):
    encoder = encoder_of(gmcae)
    assert encoder.name == "encoder"
    assert encoder.input.shape == (None, None, None, None, 1)
    names = [layer.name for layer in encoder.layers[1:]]
    assert names == [f"block{b}_conv{i}" for b in (1, 2, 3) for i in (1, 2)]
    assert [encoder.get_layer(f"block{b}_conv1").filters for b in (1, 2, 3)] == [2, 4, 8]
    assert encoder.predict(random_patches(2), verbose=0).shape == (2, 1, 1, 1, 4 * WIDTH)
    volume = np.zeros((1, 24, 40, 16, 1), np.float32)
    assert encoder.predict(volume, verbose=0).shape == (1, 3, 5, 2, 4 * WIDTH)
    assert isinstance(gmcae.get_layer("variances"), ShiftedELU)


def test_default_architecture_bottleneck():
    model = build_gmcae()
    assert encoder_of(model).output.shape == (None, None, None, None, 256)
    assert model.get_layer("bottleneck_flat").output.shape == (None, 4 * 4 * 4 * 256)
    assert model.output.shape == (None, 4 * (2 + 32**3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 12}, "multiple of 8"),
        ({"width": 0}, "width to be a positive integer"),
        ({"mixtures": 2.5}, "mixtures to be a positive integer"),
        ({"variance_floor": 0.0}, "variance_floor > 0"),
        ({"decoder": "deconv"}, "expected decoder in"),
    ],
)
def test_build_rejects_bad_options(kwargs, message):
    with pytest.raises(ModelError, match=message):
        build_gmcae(**kwargs)


# The published decoder's layers, as every GMCAE saved before `decoder` existed has them.
TRANSPOSE_DECODER_LAYERS = [
    f"decoder_block{b}_{kind}" for b in (3, 2, 1) for kind in ("upconv", "conv")
] + ["means"]


def _decoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The decoder's layers in order, from the bottleneck to the component means."""
    names = [f"decoder_block{b}_{kind}" for b in (3, 2, 1)
             for kind in ("upsample", "upconv", "conv")] + ["means"]
    found = {layer.name: layer for layer in model.layers}
    return [found[name] for name in names if name in found]


@pytest.mark.parametrize("decoder", DECODERS)
def test_both_decoders_build_the_same_interface(decoder):
    keras.utils.set_random_seed(2)
    model = build_gmcae(patch_size=PATCH, width=WIDTH, mixtures=MIXTURES, decoder=decoder)
    assert decoder_of(model) == decoder
    assert model.output.shape == (None, MIXTURES * (2 + VOXELS))
    assert model.get_layer("means").output.shape == (None, PATCH, PATCH, PATCH, MIXTURES)
    assert model.predict(random_patches(2), verbose=0).shape == (2, MIXTURES * (2 + VOXELS))
    layers = _decoder_layers(model)
    if decoder == "transpose":
        assert [layer.name for layer in layers] == TRANSPOSE_DECODER_LAYERS
        assert all(isinstance(layer, keras.layers.Conv3DTranspose) for layer in layers)
    else:
        assert not any(isinstance(layer, keras.layers.Conv3DTranspose) for layer in layers)
        assert [type(layer).__name__ for layer in layers] == (
            ["UpSampling3D", "Conv3D", "Conv3D"] * 3 + ["Conv3D"]
        )
    # Same encoder and heads whichever the decoder: the classifier never sees the difference.
    transposed = build_gmcae(patch_size=PATCH, width=WIDTH, mixtures=MIXTURES,
                             decoder="transpose")
    assert encoder_of(model).get_config() == encoder_of(transposed).get_config()
    assert model.count_params() == transposed.count_params()


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_round_trip_through_keras_files(decoder, tmp_path):
    keras.utils.set_random_seed(3)
    model = build_gmcae(patch_size=PATCH, width=WIDTH, mixtures=MIXTURES, decoder=decoder)
    path = tmp_path / f"{decoder}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert decoder_of(loaded) == decoder
    patches = random_patches(3, seed=6)
    np.testing.assert_array_equal(loaded.predict(patches, verbose=0),
                                  model.predict(patches, verbose=0))


@pytest.mark.parametrize("decoder", DECODERS)
def test_only_the_transposed_decoder_draws_a_checkerboard(decoder):
    """A constant bottleneck decodes to a constant interior (upsample) or to a periodic pattern
    (stride-2 transposed convolutions: a checkerboard of period 2 per doubling, so 2³ = 8 after
    the three blocks)."""
    keras.utils.set_random_seed(5)
    model = build_gmcae(patch_size=PATCH, width=4, mixtures=2, decoder=decoder)
    side = 8  # a larger bottleneck than the model's: convolutions take any size
    x = keras.ops.ones((1, side, side, side, 4 * 4))
    for layer in _decoder_layers(model):
        x = layer(x)
    means = keras.ops.convert_to_numpy(x)[0]
    assert means.shape == (8 * side,) * 3 + (2,)
    # Zero padding disturbs at most 15 voxels from each face (15 convolutions, 3 doublings).
    margin = 16
    interior = means[margin:-margin, margin:-margin, margin:-margin]
    scale = float(np.abs(interior).max())
    assert scale > 0
    spread = float(np.ptp(interior, axis=(0, 1, 2)).max())
    if decoder == "upsample":
        assert spread <= 1e-5 * scale
    else:
        assert spread > 1e-2 * scale
        # …and the pattern repeats every 8 voxels along each axis.
        period = DOWNSAMPLING
        for axis in range(3):
            shifted = np.take(interior, range(period, interior.shape[axis]), axis=axis)
            kept = np.take(interior, range(interior.shape[axis] - period), axis=axis)
            np.testing.assert_allclose(shifted, kept, rtol=1e-5, atol=1e-6 * scale)


def test_encoder_of_rejects_model_without_encoder():
    inputs = keras.Input((2,))
    with pytest.raises(ModelError, match="expected a kdsb model with an 'encoder'"):
        encoder_of(keras.Model(inputs, keras.layers.Dense(1)(inputs), name="plain"))


@pytest.mark.slow
@pytest.mark.parametrize("decoder", DECODERS)
def test_training_steps_reduce_loss_and_stay_finite(decoder):
    keras.utils.set_random_seed(1)
    model = build_gmcae(patch_size=PATCH, width=WIDTH, mixtures=2, decoder=decoder)
    model.compile(optimizer=keras.optimizers.Adam(1e-2, clipnorm=1.0), loss=GaussianMixtureNLL(2))
    model.optimizer.build(model.trainable_variables)  # one trace of the step (as runs.fit)
    # Smooth, structured patches: a blob of random brightness on a noisy background.
    rng = np.random.default_rng(4)
    grid = np.stack(np.meshgrid(*[np.arange(PATCH)] * 3, indexing="ij"), axis=-1)
    blob = np.exp(-np.sum((grid - 3.5) ** 2, axis=-1) / 8.0)[..., None]
    patches = (rng.uniform(-1, 1, size=(16, 1, 1, 1, 1)) * blob - 0.5).astype("float32")
    patches += rng.normal(scale=0.05, size=patches.shape).astype("float32")
    before = model.evaluate(patches, patches, verbose=0)
    history = model.fit(patches, patches, batch_size=8, epochs=6, verbose=0, shuffle=False)
    after = model.evaluate(patches, patches, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before - 0.3


def test_reconstruct_picks_highest_responsibility_component(gmcae):
    patches = random_patches(4, seed=3)
    recon = reconstruct(gmcae, patches)
    assert recon.shape == patches.shape and recon.dtype == np.float32
    log_priors, variances, means = mixture_params(gmcae, patches)
    flat = patches.reshape(4, -1).astype(np.float64)
    log_joint = log_priors + np.stack(
        [norm.logpdf(flat, means[:, k], np.sqrt(variances[:, [k]])).sum(1) for k in range(3)], 1
    )
    best = log_joint.argmax(axis=1)
    np.testing.assert_allclose(recon.reshape(4, -1), means[np.arange(4), best], rtol=1e-6)


def test_single_gaussian_baseline_matches_scipy():
    patches = np.random.default_rng(8).normal(1.0, 2.0, size=(3, 4, 4, 4, 1))
    mean, std = patches.mean(), patches.std()
    expected = -norm.logpdf(patches, mean, std).mean()
    assert mixture_nll_of_single_gaussian(patches) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(0.5 * math.log(2 * math.pi * std**2) + 0.5)
    with pytest.raises(ModelError, match="expected patches with varying voxel values"):
        mixture_nll_of_single_gaussian(np.zeros((2, 4, 4, 4, 1)))


@pytest.mark.slow
def test_mixed_bfloat16_builds_and_gives_finite_float32_loss():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_gmcae(patch_size=PATCH, width=WIDTH, mixtures=2)
        assert encoder_of(model).get_layer("block1_conv1").compute_dtype == "bfloat16"
        loss = GaussianMixtureNLL(2)
        model.compile(optimizer="adam", loss=loss)
        model.optimizer.build(model.trainable_variables)
        patches = random_patches(4)
        packed = model(patches)
        assert packed.dtype == "float32"
        value = float(loss(patches, packed))
        assert math.isfinite(value)
        assert math.isfinite(model.train_on_batch(patches, patches))
    finally:
        keras.mixed_precision.set_global_policy("float32")


