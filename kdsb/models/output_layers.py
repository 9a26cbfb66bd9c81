"""Layers appended after a classifier's output unit (its calibration map, its input record):
cut a model before one, or append one, sharing every other layer.

Not a module of registered objects (`kdsb._keras_hook`), so those modules may import it at
import time.
"""

from __future__ import annotations

import keras


def model_inputs(model: keras.Model):
    """A model's input tensor, or its list when several (so calls keep the same structure)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def without_output_layer(model: keras.Model, name: str) -> keras.Model:
    """The model up to (not including) its layer `name`; `model` itself if it has none."""
    if name not in {layer.name for layer in model.layers}:
        return model
    return keras.Model(model_inputs(model), model.get_layer(name).input, name=model.name)


def with_output_layer(model: keras.Model, layer: keras.layers.Layer) -> keras.Model:
    """`model` with `layer` applied to its output, replacing an earlier layer of that name."""
    base = without_output_layer(model, layer.name)
    return keras.Model(model_inputs(base), layer(base.outputs[0]), name=base.name)
