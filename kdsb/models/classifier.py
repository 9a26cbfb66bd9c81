"""The cancer classifier: GMCAE encoder → 3D spatial pyramid pooling → dense head → p(cancer).

The classifier reads whole cropped volumes of any size (batch, z, y, x, 1) in normalised HU,
one per batch or several of equal size. It holds its own copy of the GMCAE encoder (weights
copied, not shared), so it trains and saves independently of the GMCAE; the first blocks can be
frozen to keep the unsupervised features. Spatial pyramid pooling turns the variable-size
feature map into a fixed-length vector for the dense head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np

from kdsb.errors import ModelError, WrongModelError, first_line
from kdsb.models.gmcae import (
    ENCODER_BLOCKS,
    ENCODER_NAME,
    MIXTURE_OUTPUT_NAME,
    encoder_layer_names,
    encoder_of,
)
from kdsb.models.layers import DEFAULT_LEVELS, Log1p, SpatialPyramidPooling3D

# Shapes of every classifier `build_classifier` makes: (batch, z, y, x, 1) in, (batch, 1) out.
CLASSIFIER_INPUT_SHAPE = (None, None, None, None, 1)
CLASSIFIER_OUTPUT_SHAPE = (None, 1)


def copy_encoder(encoder: keras.Model) -> keras.Model:
    """An independent copy of `encoder` (same architecture, layer names and weight values), its
    layers computing in the current precision policy (`--precision` of the run that builds the
    classifier), whatever precision the GMCAE was trained in: a plain clone keeps each layer's
    saved policy, so a bfloat16 GMCAE gave a float32 run a 16-bit encoder (and a float16 one
    without loss scaling), and a mixed run a float32 encoder.

    Raises:
        ModelError: If `encoder` lacks the GMCAE block layers.
    """
    for block in range(1, ENCODER_BLOCKS + 1):
        for layer_name in encoder_layer_names(block):
            try:
                encoder.get_layer(layer_name)
            except ValueError:
                raise ModelError(
                    f"expected a GMCAE encoder with layer '{layer_name}', "
                    f"received model '{encoder.name}' without it"
                ) from None
    policy = keras.mixed_precision.global_policy().name

    def in_current_precision(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    copy = keras.models.clone_model(encoder, clone_function=in_current_precision)
    copy.set_weights(encoder.get_weights())
    return copy


def build_classifier(
    encoder: keras.Model,
    *,
    freeze_blocks: int = 0,
    levels: Sequence[int] = DEFAULT_LEVELS,
    pooling: str = "max",
    dense_units: int = 64,
    dropout: float = 0.5,
    log_pooled: bool = False,
    name: str = "classifier",
) -> keras.Model:
    """Build the SPP3D cancer classifier on a copy of a trained GMCAE encoder.

    Args:
        encoder: The GMCAE encoder (`kdsb.models.gmcae.encoder_of(gmcae)`), input (None, None,
        None, 1).
        freeze_blocks: How many encoder blocks, from the input side, to freeze (0..3): their
            `block{b}_conv1`/`block{b}_conv2` layers get trainable=False.
        levels: Spatial pyramid levels (bins per axis).
        pooling: "max" or "average" pooling in the pyramid.
        dense_units: Units of the hidden dense layer (ReLU).
        dropout: Dropout rate after the hidden layer, in [0, 1).
        log_pooled: Feed the dense head log(1 + f) of each pooled feature f (a `Log1p` layer
            named "log_pooled") instead of f.
        name: Model name.

    Returns:
        An uncompiled model: input (batch, z, y, x, 1) normalised HU of any size, output float32
        (batch, 1) p(cancer).

    Raises:
        ModelError: If freeze_blocks, dense_units or dropout is out of range, or the encoder is
            not a GMCAE encoder.
    """
    if isinstance(freeze_blocks, bool) or freeze_blocks not in range(ENCODER_BLOCKS + 1):
        raise ModelError(
            f"expected freeze_blocks in 0..{ENCODER_BLOCKS}, received {freeze_blocks!r}"
        )
    if isinstance(dense_units, bool) or not isinstance(dense_units, int) or dense_units < 1:
        raise ModelError(f"expected dense_units to be a positive integer, received {dense_units!r}")
    if not 0 <= dropout < 1:
        raise ModelError(f"expected dropout in [0, 1), received {dropout!r}")

    features = copy_encoder(encoder)
    for block in range(1, freeze_blocks + 1):
        for layer_name in encoder_layer_names(block):
            features.get_layer(layer_name).trainable = False

    inputs = keras.Input(shape=CLASSIFIER_INPUT_SHAPE[1:], name="volume")
    x = features(inputs)
    x = SpatialPyramidPooling3D(levels=levels, pooling=pooling, name="spp")(x)
    if log_pooled:
        x = Log1p(name="log_pooled")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="p_cancer")(x)
    return keras.Model(inputs, outputs, name=name)


def predict_probability(model: keras.Model, x: np.ndarray) -> float:
    """p(cancer) of a classifier for one prepared volume `x`, float32 (z, y, x, 1).

    A direct call runs eagerly: no retracing for every new volume shape, which `model.predict`
    would do at each size.
    """
    batch = np.ascontiguousarray(x)[np.newaxis]
    return float(np.asarray(model(batch, training=False), dtype=np.float64).ravel()[0])


def _load_keras_model(path: str | os.PathLike, what: str) -> keras.Model:
    """Load a .keras file (safe mode, uncompiled), turning every failure into `ModelError`."""
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"expected {what} .keras file, received {path!r}, which does not exist")
    if not zipfile.is_zipfile(path):  # Keras says "File not found" of a damaged archive
        raise ModelError(f"expected {what} saved as .keras (a zip archive), received {path!r}, "
                         "which is not one: cut short, damaged, or another kind of file")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for corrupt or foreign files.
        raise ModelError(f"expected {what} saved as .keras, received {path!r}, which does not "
                         f"load: {first_line(error)}") from error


def load_gmcae(path: str | os.PathLike) -> keras.Model:
    """Load a saved GMCAE (.keras, safe mode, uncompiled).

    Args:
        path: A `gmcae.keras` file written by `kdsb train-gmcae`.

    Raises:
        ModelError: If the file is missing or cannot be loaded as a Keras model;
            `WrongModelError` (exit status 2) when it is not a GMCAE (no encoder and mixture
            output).
    """
    from kdsb.models.gmcae import encoder_layer_names

    model = _load_keras_model(path, "a kdsb GMCAE")
    # Every layer the commands rely on, checked here so that a foreign model is one line naming
    # its file (found in review: one without `log_priors` reached a Keras ValueError).
    missing = sorted(gmcae_layers() - {layer.name for layer in model.layers})
    encoder = next((layer for layer in model.layers if layer.name == ENCODER_NAME), None)
    if isinstance(encoder, keras.Model):
        inside = {layer.name for layer in encoder.layers}
        missing += [f"{ENCODER_NAME}/{name}" for block in range(1, ENCODER_BLOCKS + 1)
                    for name in encoder_layer_names(block) if name not in inside]
    elif encoder is not None:
        missing.append(f"{ENCODER_NAME} (a nested model)")
    if missing:
        raise WrongModelError(
            f"expected a kdsb GMCAE, received {os.fspath(path)!r} holding model "
            f"'{model.name}' without the layer(s) {', '.join(missing)}"
        )
    return model


def gmcae_layers() -> set[str]:
    """The top-level layers every kdsb GMCAE has, which the commands rely on."""
    from kdsb.models.gmcae import BOTTLENECK_FLAT_NAME

    return {ENCODER_NAME, MIXTURE_OUTPUT_NAME, BOTTLENECK_FLAT_NAME, "log_priors", "variances",
            "means"}


def check_gmcae_archive(path: str | os.PathLike) -> None:
    """Refuse a `.keras` file that holds a model of another kind than a GMCAE (one without
    `gmcae_layers`), from the archive's config, without loading it or starting TensorFlow
    (`kdsb.io.keras_archive`); a file it cannot read is left to `load_gmcae`.

    Raises:
        WrongModelError: the archive's model lacks a GMCAE's layers.
    """
    from kdsb.io.keras_archive import model_and_layer_names

    found = model_and_layer_names(path)
    if found is None:
        return
    name, layers = found
    missing = sorted(gmcae_layers() - layers)
    if missing:
        raise WrongModelError(
            f"expected a kdsb GMCAE, received {os.fspath(path)!r} holding model '{name}' "
            f"without the layer(s) {', '.join(missing)}"
        )


def load_encoder_from_gmcae(path: str | os.PathLike) -> keras.Model:
    """The encoder (nested model, trained weights) of a saved GMCAE; see `load_gmcae`."""
    return encoder_of(load_gmcae(path))


def load_classifier(path: str | os.PathLike) -> keras.Model:
    """Load a saved cancer classifier (.keras, safe mode, uncompiled).

    Args:
        path: A `classifier.keras` (or checkpoint) written by `kdsb train-classifier`.

    Returns:
        The model: input (batch, z, y, x, 1) normalised HU, output (batch, 1) p(cancer).

    Raises:
        ModelError: If the file is missing or cannot be loaded as a Keras model;
            `WrongModelError` (exit status 2) when it holds a model of other input or output
            shapes (a GMCAE passed by mistake, for example).
    """
    model = _load_keras_model(path, "a kdsb classifier")
    input_shape = getattr(model, "input_shape", None)
    output_shape = getattr(model, "output_shape", None)
    if input_shape != CLASSIFIER_INPUT_SHAPE or output_shape != CLASSIFIER_OUTPUT_SHAPE:
        raise WrongModelError(
            f"expected a kdsb classifier (input {CLASSIFIER_INPUT_SHAPE}, output "
            f"{CLASSIFIER_OUTPUT_SHAPE}), received {os.fspath(path)!r} holding model "
            f"'{model.name}' with input {input_shape} and output {output_shape}"
        )
    return model
