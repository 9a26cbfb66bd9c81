"""A classifier head that learns from few patients: attention multiple-instance learning (MIL).

A volume is a bag of instances: the cells of a frozen GMCAE encoder block's output (`--head mil`,
`encoder_instances`; block 2 by default: one cell per 4³ input voxels, each the embedding of the
patch its receptive field covers; on the phantoms its features separated the classes far better
than the bottleneck's), or the GMCAE's NLL of each patch (`--head nll`,
`kdsb.models.nll.patch_nll_features`).
A patient has cancer when some instance shows a cancer; which one is unknown. The head (Ilse,
Tomczak and Welling, "Attention-based deep multiple instance learning", ICML 2018) embeds each
instance,
h_i = ReLU(W · standardise(e_i)), weighs them with gated attention,

    a_i = softmax_i( w · (tanh(V h_i) ⊙ sigmoid(U h_i)) ),   z = Σ_i a_i h_i,

and maps z to p(cancer) with one dense unit. "max" pooling (z = max_i h_i, per unit) is the
other classic MIL pooling. Only the head trains (a few thousand weights): the encoder is the
unsupervised GMCAE's, frozen, so its features can be computed once per volume
(`kdsb.training.bags`) and the head trained on them in seconds.

`build_mil_classifier` returns two models that share the head's layers: the full classifier
(volume in, p(cancer) out: the same contract as the SPP classifier, so predict, TTA, explain and
calibration treat both alike) and the head alone, trained on padded bags of precomputed
features with a mask of the real instances.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

POOLINGS = ("attention", "max")
# The attention score given to padded instances (it replaces theirs): their softmax weight
# underflows to 0.
MASKED_SCORE = -1e9


@keras.saving.register_keras_serializable(package="kdsb")
class AttentionMILPooling(keras.layers.Layer):
    """Pool a bag of instance embeddings into one vector: gated attention or max.

    Input: (batch, ..., units) instances (every axis between the first and the last is an
    instance axis: (batch, n, units) or a feature grid (batch, z, y, x, units)), and optionally
    a mask (batch, ...) of the real instances (1) and padding (0). Output: (batch, units).

    Args:
        attention_units: width of the attention network (V and U).
        pooling: "attention" (gated attention) or "max".
        **kwargs: standard Keras layer arguments.
    """

    def __init__(self, attention_units: int = 16, pooling: str = "attention", **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(
                f"AttentionMILPooling: expected pooling in {POOLINGS}, received {pooling!r}"
            )
        whole = (isinstance(attention_units, (int, float)) and not isinstance(attention_units, bool)
                 and math.isfinite(attention_units) and attention_units == int(attention_units))
        if not whole or attention_units < 1:
            raise ValueError(f"AttentionMILPooling: expected attention_units of at least 1, "
                             f"received {attention_units!r}")
        self.attention_units = int(attention_units)
        self.pooling = pooling

    def build(self, input_shape):
        units = input_shape[-1]
        if self.pooling == "attention":
            self.v = self.add_weight(shape=(units, self.attention_units), name="v",
                                     initializer="glorot_uniform")
            self.u = self.add_weight(shape=(units, self.attention_units), name="u",
                                     initializer="glorot_uniform")
            self.w = self.add_weight(shape=(self.attention_units, 1), name="w",
                                     initializer="glorot_uniform")

    def attention(self, instances, mask=None):
        """Attention weights (batch, n) of flattened instances (batch, n, units)."""
        gate = ops.tanh(ops.matmul(instances, self.v)) * ops.sigmoid(ops.matmul(instances, self.u))
        scores = ops.squeeze(ops.matmul(gate, self.w), axis=-1)
        if mask is not None:
            scores = ops.where(ops.cast(mask, "bool"), scores, MASKED_SCORE)
        return ops.softmax(scores, axis=-1)

    def call(self, inputs, mask=None):
        units = ops.shape(inputs)[-1]
        instances = ops.reshape(inputs, (ops.shape(inputs)[0], -1, units))
        if mask is not None:
            mask = ops.reshape(mask, (ops.shape(inputs)[0], -1))
        if self.pooling == "max":
            if mask is not None:
                instances = ops.where(ops.cast(mask, "bool")[..., None], instances, -np.inf)
            return ops.max(instances, axis=1)
        weights = self.attention(instances, mask)
        return ops.sum(instances * ops.cast(weights, instances.dtype)[..., None], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"attention_units": self.attention_units, "pooling": self.pooling})
        return config


def truncated_encoder(encoder: keras.Model, block: int) -> keras.Model:
    """The encoder up to the output of `block` (1..3), keeping its name and layers."""
    from kdsb.models.gmcae import ENCODER_BLOCKS, encoder_layer_names

    if block not in range(1, ENCODER_BLOCKS + 1):
        raise ValueError(f"expected an encoder block in 1..{ENCODER_BLOCKS}, received {block!r}")
    if block == ENCODER_BLOCKS:
        return encoder
    last = encoder.get_layer(encoder_layer_names(block)[1])
    return keras.Model(encoder.inputs[0], last.output, name=encoder.name)


def encoder_instances(encoder: keras.Model, block: int = 2) -> keras.Model:
    """A frozen copy of the GMCAE encoder up to `block`: volume → instance cells."""
    # Imported here: this module is imported as soon as Keras loads (`kdsb._keras_hook`), before
    # the GMCAE module that `kdsb.models.classifier` builds on.
    from kdsb.models.classifier import copy_encoder

    features = truncated_encoder(copy_encoder(encoder), block)
    features.trainable = False
    return features


def build_mil_classifier(
    features: keras.Model,
    *,
    feature_mean: np.ndarray,
    feature_variance: np.ndarray,
    units: int,
    pooling: str,
    dropout: float,
    attention_units: int = 16,
    name: str = "classifier",
) -> tuple[keras.Model, keras.Model]:
    """The MIL classifier on frozen instance features, and its head alone.

    Args:
        features: the frozen model (batch, z, y, x, 1) volume → (batch, ..., channels)
            instances: `encoder_instances` or `kdsb.models.nll.patch_nll_features`.
        feature_mean, feature_variance: per-channel statistics of the training instances
            (channels,), which standardise every instance.
        units: width of the instance embedding.
        attention_units: width of the attention network.
        pooling: "attention" or "max".
        dropout: dropout on the pooled vector.
        name: name of the full model.

    Returns:
        (classifier: (batch, z, y, x, 1) normalised HU → (batch, 1) p(cancer); head:
        [(batch, n, channels) instances, (batch, n) mask] → (batch, 1) p(cancer)). The head is
        what trains; the classifier shares its layers and is what gets saved.
    """
    from kdsb.models.classifier import CLASSIFIER_INPUT_SHAPE

    channels = int(features.output.shape[-1])
    mean = np.asarray(feature_mean, dtype=np.float32).reshape(channels)
    variance = np.maximum(np.asarray(feature_variance, dtype=np.float32).reshape(channels), 1e-6)
    layers = [
        keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="mil_standardise"),
        keras.layers.Dense(units, activation="relu", name="mil_instance"),
    ]
    # In float32 whatever the precision (found in review: under mixed_float16 the attention
    # weights of a bag of 60k instances, ~1/n, are subnormal and flushed to 0, so the pooled
    # vector shrank with the volume's size; the output layer is float32 for the same reason).
    pool = AttentionMILPooling(attention_units, pooling, name="mil_pooling", dtype="float32")
    drop = keras.layers.Dropout(dropout, name="head_dropout")
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="p_cancer")

    def head_of(x, mask=None):
        for layer in layers:
            x = layer(x)
        return out(drop(pool(x, mask=mask)))

    bag = keras.Input(shape=(None, channels), name="instances")
    mask = keras.Input(shape=(None,), name="instance_mask")
    head = keras.Model([bag, mask], head_of(bag, mask), name=f"{name}_head")
    volume = keras.Input(shape=CLASSIFIER_INPUT_SHAPE[1:], name="volume")
    classifier = keras.Model(volume, head_of(features(volume)), name=name)
    return classifier, head
