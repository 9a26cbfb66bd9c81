"""How a classifier reads a volume, carried inside the saved model.

The model-input contract (docs/DESIGN.md) asks a trained classifier to carry its training
spacing, HU normalisation and masking rule, so a `classifier.keras` copied on its own is still
fed the way it was trained. Keras 3 saves no free-form metadata with a functional model, so the
record is the configuration of a registered identity layer, `VolumeInputRecord`, appended to the
model's output (`with_input_record`); `input_record_of` reads it back. The record's fields are
those of `kdsb.data.inputs.VolumeInput.to_config`, which owns their meaning and checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from kdsb.models.output_layers import with_output_layer, without_output_layer

INPUT_RECORD_LAYER = "input_record"


@keras.saving.register_keras_serializable(package="kdsb")
class VolumeInputRecord(keras.layers.Layer):
    """The identity; its configuration holds the model's `VolumeInput` (`volume_input`)."""

    def __init__(self, volume_input: Mapping[str, Any], **kwargs):
        # float32 whatever the precision policy: under mixed_bfloat16 the probability passing
        # through would be cast to 16 bits (found in review), as for `p_cancer` and calibration.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.volume_input = dict(volume_input)

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config["volume_input"] = dict(self.volume_input)
        return config


def without_input_record(model: keras.Model) -> keras.Model:
    """The model up to (not including) its record layer; `model` itself if it has none."""
    return without_output_layer(model, INPUT_RECORD_LAYER)


def with_input_record(model: keras.Model, volume_input: Mapping[str, Any]) -> keras.Model:
    """A model sharing `model`'s layers whose output passes the record layer (an earlier
    record replaced)."""
    return with_output_layer(model, VolumeInputRecord(volume_input, name=INPUT_RECORD_LAYER))


def input_record_of(model: keras.Model) -> dict[str, Any] | None:
    """The `VolumeInput` configuration a model carries, or None for one without the record."""
    if INPUT_RECORD_LAYER not in {layer.name for layer in model.layers}:
        return None
    return dict(model.get_layer(INPUT_RECORD_LAYER).volume_input)
