"""The Gaussian mixture convolutional autoencoder (GMCAE): builder and inference helpers.

The GMCAE is a convolutional autoencoder cast as a mixture density network. A patch of P³
voxels (normalised HU, channels last, axes (z, y, x)) goes through an encoder of three blocks
(Conv3D stride 1 + Conv3D stride 2, ReLU; filters w, 2w, 4w) to a (P/8)³ × 4w bottleneck. From
the bottleneck, two dense heads give m log-priors (log-softmax) and m variances (ShiftedELU, one
isotropic variance per component per patch); a decoder mirroring the encoder gives m whole-patch
means. The model outputs one packed float32 tensor (batch, m·(2 + c)), c = P³, laid out as
`kdsb.models.losses.split_mixture_params` reads it, and is trained with
`kdsb.models.losses.GaussianMixtureNLL` (compiled by the trainer, not here).

Two decoders (`DECODERS`), the same encoder, heads and parameter count:

- "upsample", the default: per block nearest-neighbour UpSampling3D(2), then two Conv3D, and a
  Conv3D for the means. Every output voxel sees the same taps, so no checkerboard. On
  real-anatomy patches (`benchmarks/gmcae_likelihood.py`, same budget and seed) it reached a
  lower validation NLL than the published decoder (-0.08 against 0.15 nats per voxel, width 8,
  300 steps), for about 1.35× the training time on a CPU (its convolutions run on the upsampled
  grid).
- "transpose", the published one: stride-2 Conv3DTranspose, whose overlapping kernels leave a
  periodic (checkerboard) pattern. Models saved before the choice existed have this decoder,
  with the same layer names, and load as they are.

The encoder is a nested model named "encoder" whose input is (None, None, None, 1), so the
classifier reuses it unchanged on whole volumes of any size. Its layer names
(`block{b}_conv1`, `block{b}_conv2`, b = 1..3) are stable: freezing and weight transfer use them.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kdsb.errors import ModelError
from kdsb.models.layers import DEFAULT_VARIANCE_FLOOR, ShiftedELU
from kdsb.models.losses import split_mixture_params

#: Encoder blocks; each halves every spatial side, so patch sides must be multiples of 2**3.
ENCODER_BLOCKS = 3
DOWNSAMPLING = 2**ENCODER_BLOCKS

#: Kernel side of every convolution (voxels).
KERNEL_SIZE = 3

#: Name of the nested encoder model inside a GMCAE (and inside a classifier).
ENCODER_NAME = "encoder"

#: Name of the GMCAE's packed output layer (marks a model as a GMCAE).
MIXTURE_OUTPUT_NAME = "mixture_params"
BOTTLENECK_FLAT_NAME = "bottleneck_flat"  # its input is the encoder's output in the GMCAE

#: Batch size of the NumPy inference helpers.
PREDICT_BATCH_SIZE = 16

#: Decoders of `build_gmcae`: "transpose" (published: stride-2 Conv3DTranspose) or "upsample"
#: (nearest-neighbour UpSampling3D(2) then Conv3D: no checkerboard).
DECODERS = ("transpose", "upsample")
DEFAULT_DECODER = "upsample"


def block_filters(width: int) -> tuple[int, ...]:
    """Filters of encoder blocks 1..3 for base width w: (w, 2w, 4w)."""
    return tuple(width * 2**b for b in range(ENCODER_BLOCKS))


def encoder_layer_names(block: int) -> tuple[str, str]:
    """Names of the two convolutions of encoder block `block` (1-based)."""
    return f"block{block}_conv1", f"block{block}_conv2"


def build_encoder(*, width: int = 64, name: str = ENCODER_NAME) -> keras.Model:
    """The GMCAE encoder on volumes of any size: (batch, z, y, x, 1) → (batch, z/8, y/8, x/8, 4w).

    Args:
        width: Base number of filters w (blocks have w, 2w, 4w).
        name: Model name.

    Returns:
        An uncompiled functional model with input shape (None, None, None, 1). Spatial sides are
        divided by 8 rounding up ("same" padding).
    """
    inputs = keras.Input(shape=(None, None, None, 1), name="volume")
    x = inputs
    for block, filters in enumerate(block_filters(width), start=1):
        conv1, conv2 = encoder_layer_names(block)
        x = keras.layers.Conv3D(
            filters, KERNEL_SIZE, strides=1, padding="same", activation="relu", name=conv1
        )(x)
        x = keras.layers.Conv3D(
            filters, KERNEL_SIZE, strides=2, padding="same", activation="relu", name=conv2
        )(x)
    return keras.Model(inputs, x, name=name)


def _decoder(bottleneck, *, decoder: str, width: int, mixtures: int):
    """The decoder from the bottleneck to the m component means, (batch, P, P, P, m) float32.

    Each encoder block is mirrored by an upsampling step and a stride-1 convolution. Layer
    names are shared by both decoders (`decoder_block{b}_upconv`, `decoder_block{b}_conv`,
    `means`; the upsample decoder adds `decoder_block{b}_upsample`), and are those of the
    published transpose decoder, so its saved models keep their names.
    """
    x = bottleneck
    for block, filters in reversed(list(enumerate(block_filters(width), start=1))):
        upconv, conv = f"decoder_block{block}_upconv", f"decoder_block{block}_conv"
        if decoder == "transpose":
            # A stride-2 kernel of 3 overlaps every other output voxel twice: the checkerboard.
            x = keras.layers.Conv3DTranspose(
                filters, KERNEL_SIZE, strides=2, padding="same", activation="relu", name=upconv
            )(x)
            x = keras.layers.Conv3DTranspose(
                filters, KERNEL_SIZE, strides=1, padding="same", activation="relu", name=conv
            )(x)
        else:
            # Every output voxel sees the same number of taps: no period-2 pattern by design.
            x = keras.layers.UpSampling3D(2, name=f"decoder_block{block}_upsample")(x)
            x = keras.layers.Conv3D(
                filters, KERNEL_SIZE, padding="same", activation="relu", name=upconv
            )(x)
            x = keras.layers.Conv3D(
                filters, KERNEL_SIZE, padding="same", activation="relu", name=conv
            )(x)
    means_layer = keras.layers.Conv3DTranspose if decoder == "transpose" else keras.layers.Conv3D
    return means_layer(mixtures, KERNEL_SIZE, padding="same", dtype="float32", name="means")(x)


def _validate_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"expected {name} to be a positive integer, received {value!r}")


def build_gmcae(
    *,
    patch_size: int = 32,
    width: int = 64,
    mixtures: int = 4,
    variance_floor: float = DEFAULT_VARIANCE_FLOOR,
    decoder: str = DEFAULT_DECODER,
    name: str = "gmcae",
) -> keras.Model:
    """Build the GMCAE for cubic patches of `patch_size`³ voxels.

    Args:
        patch_size: Patch side P in voxels, a multiple of 8.
        width: Base number of filters w.
        mixtures: Number of mixture components m.
        variance_floor: Smallest variance the ShiftedELU head can output (normalised HU²).
        decoder: One of `DECODERS`: "upsample" (UpSampling3D(2) + Conv3D per block, Conv3D
            means: no checkerboard artefacts) or "transpose" (the published decoder, stride-2
            Conv3DTranspose).
        name: Model name.

    Returns:
        An uncompiled model: input (batch, P, P, P, 1) normalised HU, output float32
        (batch, m·(2 + P³)) = [log_priors (m) | variances (m) | means (m·P³)].

    Raises:
        ModelError: If a size is not a positive integer, P is not a multiple of 8, the floor
            is not positive, or the decoder is unknown.
    """
    for arg_name, value in (("patch_size", patch_size), ("width", width), ("mixtures", mixtures)):
        _validate_positive(arg_name, value)
    if patch_size % DOWNSAMPLING:
        raise ModelError(
            f"expected patch_size to be a multiple of {DOWNSAMPLING}, received {patch_size}"
        )
    if not variance_floor > 0:
        raise ModelError(f"expected variance_floor > 0, received {variance_floor!r}")
    if decoder not in DECODERS:
        raise ModelError(f"expected decoder in {DECODERS}, received {decoder!r}")

    inputs = keras.Input(shape=(patch_size,) * 3 + (1,), name="patch")
    encoder = build_encoder(width=width)
    bottleneck = encoder(inputs)

    # Mixture weights and variances summarise the whole patch: dense heads on the bottleneck.
    flat = keras.layers.Flatten(name=BOTTLENECK_FLAT_NAME)(bottleneck)
    log_priors = keras.layers.Dense(
        mixtures, activation="log_softmax", dtype="float32", name="log_priors"
    )(flat)
    variance_logits = keras.layers.Dense(mixtures, dtype="float32", name="variance_logits")(flat)
    variances = ShiftedELU(floor=variance_floor, dtype="float32", name="variances")(variance_logits)

    means = _decoder(bottleneck, decoder=decoder, width=width, mixtures=mixtures)
    # (batch, z, y, x, m) → (batch, m, z, y, x) → one flattened patch per component.
    means = keras.layers.Permute((4, 1, 2, 3), dtype="float32", name="means_by_component")(means)
    means = keras.layers.Flatten(dtype="float32", name="means_flat")(means)

    packed = keras.layers.Concatenate(dtype="float32", name=MIXTURE_OUTPUT_NAME)(
        [log_priors, variances, means]
    )
    return keras.Model(inputs, packed, name=name)


def mixtures_of(model: keras.Model) -> int:
    """Number of mixture components m of a GMCAE (from its log-prior head)."""
    return int(model.get_layer("log_priors").units)


def codes_and_mixtures(model: keras.Model) -> keras.Model:
    """A GMCAE with two outputs: patches (n, P, P, P, 1) → (the encoder's bottleneck codes
    (n, P/8, P/8, P/8, C), the packed mixture parameters), the same layers and weights. One
    pass runs the encoder once a patch (the encoder's pass and then the GMCAE's ran it twice).
    """
    bottleneck = model.get_layer(BOTTLENECK_FLAT_NAME).input  # the encoder's output in `model`
    return keras.Model(model.inputs, [bottleneck, model.output], name=f"{model.name}_codes")


def encoder_of(model: keras.Model) -> keras.Model:
    """The nested "encoder" model of a GMCAE (or of a classifier).

    Raises:
        ModelError: If the model has no encoder sub-model.
    """
    try:
        encoder = model.get_layer(ENCODER_NAME)
    except ValueError:
        encoder = None
    if not isinstance(encoder, keras.Model):
        raise ModelError(
            f"expected a kdsb model with an '{ENCODER_NAME}' sub-model, "
            f"received model '{model.name}' without one"
        )
    return encoder


def mixture_params(
    model: keras.Model, patches: np.ndarray, *, batch_size: int = PREDICT_BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixture parameters the GMCAE assigns to each patch, as float32 NumPy arrays.

    Args:
        model: A GMCAE from `build_gmcae` (or loaded from .keras).
        patches: (n, P, P, P, 1) normalised HU.
        batch_size: Patches per forward pass.

    Returns:
        log_priors (n, m), variances (n, m), means (n, m, P³) (each mean in (z, y, x) C order).
    """
    packed = model.predict(np.asarray(patches, dtype="float32"), batch_size=batch_size, verbose=0)
    log_priors, variances, means = split_mixture_params(packed, mixtures_of(model))
    return tuple(keras.ops.convert_to_numpy(x) for x in (log_priors, variances, means))


def responsibilities(
    patches: np.ndarray, log_priors: np.ndarray, variances: np.ndarray, means: np.ndarray
) -> np.ndarray:
    """Posterior responsibility p(k | t) of each component for each patch (float64, rows sum to 1).

    Args:
        patches: (n, ...) patches, flattened to (n, c).
        log_priors: (n, m); variances: (n, m); means: (n, m, c) as from `mixture_params`.
    """
    targets = np.asarray(patches, dtype=np.float64).reshape(len(patches), -1)
    variances = np.asarray(variances, dtype=np.float64)
    voxels = targets.shape[1]
    squared_distance = np.sum((targets[:, None, :] - means.astype(np.float64)) ** 2, axis=-1)
    log_joint = (
        log_priors
        - 0.5 * voxels * np.log(2.0 * math.pi * variances)
        - squared_distance / (2.0 * variances)
    )
    log_joint -= log_joint.max(axis=1, keepdims=True)
    weights = np.exp(log_joint)
    return weights / weights.sum(axis=1, keepdims=True)


def reconstruct(
    model: keras.Model, patches: np.ndarray, *, batch_size: int = PREDICT_BATCH_SIZE
) -> np.ndarray:
    """Reconstruct patches as the mean of their most probable mixture component.

    Rule: for each patch t the component with the highest posterior responsibility
    p(k | t) ∝ α_k N(t | μ_k, σ_k² I) is chosen and its mean μ_k returned. This is the component
    the model itself judges to have generated the patch, i.e. the one that dominates the
    logsumexp in the training loss; the highest prior alone would ignore how well each mean
    fits the patch the autoencoder has just seen.

    Args:
        model: A GMCAE.
        patches: (n, P, P, P, 1) normalised HU.
        batch_size: Patches per forward pass.

    Returns:
        (n, P, P, P, 1) float32 reconstructions in normalised HU.
    """
    patches = np.asarray(patches, dtype="float32")
    log_priors, variances, means = mixture_params(model, patches, batch_size=batch_size)
    best = responsibilities(patches, log_priors, variances, means).argmax(axis=1)
    chosen = means[np.arange(len(patches)), best]
    return chosen.reshape(patches.shape).astype("float32")


def mixture_nll_of_single_gaussian(patches: np.ndarray) -> float:
    """Baseline NLL per voxel of one Gaussian (global mean and variance) fitted to the patches.

    The maximum-likelihood fit of a single N(μ, σ²) to every voxel of every patch gives a
    per-voxel NLL of ½·log(2π σ²) + ½; a GMCAE that has learned anything must score clearly
    below it on the same patches.

    Args:
        patches: Patches of any shape (normalised HU).

    Returns:
        The per-voxel NLL (nats).

    Raises:
        ModelError: If there are no voxels or they are all equal (σ² = 0).
    """
    values = np.asarray(patches, dtype=np.float64)
    variance = float(values.var()) if values.size else 0.0
    if not variance > 0:
        raise ModelError(
            f"expected patches with varying voxel values, received {values.size} voxels "
            f"with variance {variance}"
        )
    return 0.5 * math.log(2.0 * math.pi * variance) + 0.5
