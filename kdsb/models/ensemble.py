"""One saved classifier made of several: the fold models of a cross-validated run.

`kdsb predict RUN_DIR` scores a cross-validated run with its fold models, averaging their logits
(`kdsb.evaluation.predict.ensemble_probability`). The command contract also promises one
`RUN_DIR/classifier.keras` a user can load on its own; `ensemble_of` builds it: each member is
nested whole (calibration included) and `MeanLogit` joins their probabilities the same way,
so the file and `kdsb predict RUN_DIR` give the same probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

ENSEMBLE_NAME = "fold_ensemble"


@keras.saving.register_keras_serializable(package="kdsb")
class MeanLogit(keras.layers.Layer):
    """Probabilities [(batch, 1), …] → sigmoid of their mean logit (each clipped to
    [EPSILON, 1 − EPSILON] first, as `kdsb.models.calibration.logit`), float32."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        # Here, not at the top: this module is imported by the Keras hook (kdsb._keras_hook)
        # while the calibration module may still be importing Keras itself.
        from kdsb.models.calibration import EPSILON

        p = ops.clip(ops.stack([ops.cast(x, "float32") for x in inputs]), EPSILON, 1.0 - EPSILON)
        return ops.sigmoid(ops.mean(ops.log(p) - ops.log1p(-p), axis=0))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


def ensemble_of(members: Sequence[keras.Model]) -> keras.Model:
    """A classifier whose p(cancer) is `MeanLogit` of the `members`' (each nested as
    `member_k`, k from 1, sharing their layers); input (batch, z, y, x, 1) normalised HU."""
    from kdsb.models.classifier import CLASSIFIER_INPUT_SHAPE

    if not members:
        raise ValueError("ensemble_of: expected at least one member, received none")
    volume = keras.Input(shape=CLASSIFIER_INPUT_SHAPE[1:], name="volume")
    outputs = [
        keras.Model(member.inputs[0], member.outputs[0], name=f"member_{k}")(volume)
        for k, member in enumerate(members, start=1)
    ]
    return keras.Model(volume, MeanLogit(name="mean_logit")(outputs), name=ENSEMBLE_NAME)
