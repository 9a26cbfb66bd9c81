"""Grad-CAM of a kdsb classifier: where the encoder's last convolution drove the logit.

The classifier is encoder → pooling (spatial pyramid, or MIL) → dense head. The encoder's
output A (its last convolution, after ReLU; 1/8 of the input per axis) is recorded, the head
run on it under a gradient tape, and the gradient of the logit (the output layer's value before
its sigmoid, which never saturates: at p = 1.0 in float32 a gradient through p is zero and the
map would be empty) with respect to A averaged over space gives one weight per channel; the map
is ReLU(Σ_c w_c A_c). One forward and one backward pass per patient and model.

The map is drawn on the volume grid (`kdsb.evaluation.explain.to_volume_grid`) by linear
interpolation between the cells' centres: cell i of an axis of m input voxels is centred on
input voxel 8i + offset (`cell_centres`; 4i + 0–3 for a MIL head's block-2 cells), where the
offset (0–7) follows from TensorFlow's "same" padding of each stride-2 convolution (odd sizes
are padded on both sides, even ones only after the data), as `tests/test_explain.py` checks
against the encoder's response to a blob.

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The classifier's output unit (sigmoid), in the SPP and the MIL classifier alike.
OUTPUT_LAYER = "p_cancer"


def split_classifier(model: Any) -> tuple[Any, list[Any], Any]:
    """The encoder sub-model, the layers between it and the output unit (pyramid pooling or MIL
    pooling, dense head) and the output unit `p_cancer` (a calibration after it is monotone,
    so it does not change where the model looks)."""
    from kdsb.errors import ModelError, WrongModelError
    from kdsb.models.ensemble import ENSEMBLE_NAME
    from kdsb.models.gmcae import encoder_of

    try:
        encoder = encoder_of(model)
    except ModelError:
        # Each case its own advice (found by a user's trial: an nll run's RUN_DIR was told to
        # pass the RUN_DIR).
        why = ("a cross-validated run's own classifier.keras nests its fold models: pass the "
               "RUN_DIR, whose fold models each have one" if model.name == ENSEMBLE_NAME else
               "head nll: its instances are patch likelihoods; use --method occlusion")
        raise WrongModelError(
            f"expected a classifier with an encoder for Grad-CAM, received '{model.name}' "
            f"without one ({why})"
        ) from None
    output = model.get_layer(OUTPUT_LAYER)
    layers = [layer for layer in model.layers if not layer.name.startswith("volume")]
    return encoder, layers[layers.index(encoder) + 1: layers.index(output)], output


def cell_centres(encoder: Any, extent: int) -> tuple[int, float]:
    """Where the encoder's output cells lie along an axis of `extent` input voxels: (stride,
    offset), cell i centred on input voxel stride · i + offset.

    Each convolution with "same" padding centres output j on input s · j + (k - 1) / 2 - p,
    s its stride, k its kernel and p the padding TensorFlow puts before the data (half the
    total, rounded down); composed over the layers, last to first.
    """
    layers = [layer for layer in encoder.layers if getattr(layer, "strides", None)]
    sizes = []
    for layer in layers:  # each layer's input extent
        sizes.append(extent)
        extent = -(-extent // int(layer.strides[0]))
    stride, offset = 1, 0.0
    for layer, size in zip(reversed(layers), reversed(sizes), strict=True):
        s, k = int(layer.strides[0]), int(layer.kernel_size[0])
        before = max((-(-size // s) - 1) * s + k - size, 0) // 2
        stride, offset = s * stride, s * offset + (k - 1) / 2 - before
    return stride, offset


def gradcam(
    model: Any, x: np.ndarray
) -> tuple[np.ndarray, float, list[tuple[int, float]]]:
    """Grad-CAM of one prepared input.

    Args:
        model: a kdsb classifier (input (batch, z, y, x, 1), output (batch, 1) p(cancer)).
        x: the prepared input, float32 (z, y, x, 1).

    Returns:
        (map on the encoder's output grid (z', y', x'), float32, >= 0; the model's p(cancer);
        per axis, where the map's cells lie on the input (`cell_centres`)).
    """
    import tensorflow as tf

    from kdsb.models.calibration import calibration_of

    encoder, hidden, output = split_classifier(model)
    features = encoder(x[np.newaxis], training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        out = features
        for layer in hidden:
            out = layer(out, training=False)
        # The output layer's pre-activation: a saturated sigmoid (p = 1.0 in float32) would
        # have no gradient left.
        logit = tf.matmul(tf.cast(out, tf.float32), tf.cast(output.kernel, tf.float32))
        logit = logit[0, 0] + tf.cast(output.bias[0], tf.float32)
    gradient = tape.gradient(logit, features)
    weights = tf.reduce_mean(tf.cast(gradient, tf.float32), axis=(1, 2, 3))  # (1, channels)
    cam = tf.nn.relu(tf.einsum("bzyxc,bc->bzyx", tf.cast(features, tf.float32), weights))
    p = float(tf.sigmoid(logit))
    calibration = calibration_of(model)
    if calibration is not None:
        p = float(calibration.apply(p))
    centres = [cell_centres(encoder, n) for n in x.shape[:3]]
    return cam[0].numpy().astype(np.float32), p, centres
