"""The encoder's first block computed in z-slabs, recomputed in the backward pass.

Memory of a whole-volume classifier step is dominated by the first encoder block: its two
convolutions (Conv3D w filters stride 1, Conv3D w filters stride 2, ReLU, "same" padding) run
at full resolution, so training stores several w-channel tensors per voxel (and their
gradients): ~1 GiB per million voxels at w = 64 in float32 (benchmarks/gpu_check.py
--host-memory), ~28 GiB for a 1 mm lung of 300×250×350. Here that block runs slab by slab
along z, each slab with the halo its two 3-voxel kernels read, and nothing of it is kept for
the backward pass but the block's input and output: the backward pass recomputes one slab at
a time and accumulates the weight gradients. The full-resolution w-channel tensors then exist
for one slab at a time only: ~0.1 GiB per million voxels more, plus the slab's (~3.5 GiB for
slabs of 32 at 250×350), ~7 GiB for that lung. The price is the recomputation: on a loaded
2-core CPU a step took +15 % (96³, interleaved with plain steps) to 2-3× (separate runs).

The result equals the plain block's (TensorFlow's "SAME" padding reproduced exactly, also its
odd-length case of the stride-2 convolution) up to float rounding. Slab boundaries fall on
even z of the input (the block's output rows are split into groups of tile_z / 2).

`compute_first_block_in_slabs(model, tile_z)` switches a classifier (or a bare encoder) to it:
how its steps are computed changes, its layers, weights and saved file do not (a model loaded
from disk computes the plain way again). The volume is data: no gradient flows back to it.
"""

from __future__ import annotations

import types
from typing import Any

from kdsb.errors import ModelError
from kdsb.models.gmcae import ENCODER_BLOCKS, ENCODER_NAME, KERNEL_SIZE, encoder_layer_names

# The strides of the two convolutions of an encoder block (see `build_encoder`).
FIRST_BLOCK_STRIDES = (1, 2)
# Rows one 3-voxel kernel reads beyond an output row, on each side.
HALO = KERNEL_SIZE // 2


def _check_first_block(conv1: Any, conv2: Any) -> None:
    """Raise ModelError unless the block is the one `build_encoder` makes."""
    for layer, stride in zip((conv1, conv2), FIRST_BLOCK_STRIDES, strict=True):
        config = layer.get_config()
        expected = {
            "kernel_size": (KERNEL_SIZE,) * 3, "strides": (stride,) * 3, "padding": "same",
            "dilation_rate": (1, 1, 1), "data_format": "channels_last", "use_bias": True,
            "activation": "relu", "groups": 1,
        }
        received = {key: config.get(key) for key in expected}
        received = {k: tuple(v) if isinstance(v, list) else v for k, v in received.items()}
        if received != expected:
            raise ModelError(
                f"expected encoder layer '{layer.name}' as build_encoder makes it ({expected}), "
                f"received {received}"
            )


def first_block_in_slabs(volume: Any, weights: tuple[Any, ...], tile_z: int) -> Any:
    """The first encoder block on `volume`, one z-slab of `tile_z` input rows at a time.

    Args:
        volume: (batch, z, y, x, channels) tensor in the compute dtype.
        weights: float32 (kernel1, bias1, kernel2, bias2) of the block's two convolutions.
        tile_z: input rows per slab, even (conv1 computes tile_z + 2 rows of it, reading the
            slab's own input rows and 1 before, 3 after along an even depth; 2 and 2 along an
            odd one, which "SAME" padding pads by one row before).

    Returns:
        (batch, ceil(z/2), ceil(y/2), ceil(x/2), filters): relu(conv2(relu(conv1(volume)))),
        as the plain block computes it; its gradient reaches the weights, not the volume.
    """
    import tensorflow as tf

    shape = tf.shape(volume)
    depth = shape[1]
    rows = tile_z // 2  # output rows per slab
    out_depth = (depth + 1) // 2
    slabs = (out_depth + rows - 1) // rows
    # "SAME" padding of the stride-2 kernel along z pads one row before an odd depth, none
    # before an even one: output row o reads conv1's rows 2o - z_pad + (0, 1, 2).
    z_pad = depth % 2

    def slab(first, block_weights):
        """Output rows [first, first + rows) of the block (fewer at the end)."""
        kernel1, bias1, kernel2, bias2 = (tf.cast(w, volume.dtype) for w in block_weights)
        last = tf.minimum(first + rows, out_depth)
        # conv1's rows [start, stop) that those output rows read, plus one, inside the volume.
        # Then conv2 can run with "SAME" padding on them (y and x are whole, so that is the
        # plain block's padding there): along z its padding is (0, 1) for an even count of
        # rows, its output row j reads rows start + 2j + (0, 1, 2), and the one extra output
        # row is dropped; at z = 0 of an odd depth the count is odd and the padding (1, 1)
        # supplies the zero row before the volume. Padding the 64-channel rows instead would
        # copy them (a quarter of the block's time on a CPU).
        start = tf.maximum(2 * first - z_pad, 0)
        stop = tf.minimum(2 * last - z_pad + 2, depth)
        # conv1 without padding on the volume's rows it reads (a halo, zeros beyond the
        # volume), padded in y and x as "SAME" pads: its output rows are [start, stop).
        x_start = tf.maximum(start - HALO, 0)
        x_stop = tf.minimum(stop + HALO, depth)
        x = tf.pad(volume[:, x_start:x_stop], [[0, 0], [x_start - start + HALO,
                                                        stop + HALO - x_stop],
                                               [HALO, HALO], [HALO, HALO], [0, 0]])
        h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(x, kernel1, [1] * 5, "VALID"), bias1))
        out = tf.nn.conv3d(h, kernel2, [1, 2, 2, 2, 1], "SAME")
        return tf.nn.relu(tf.nn.bias_add(out[:, :last - first], bias2))

    def loop(body, initial):
        # One slab at a time: parallel iterations would hold several slabs' tensors at once.
        return tf.while_loop(lambda i, *_: i < slabs, body, (tf.constant(0), *initial),
                             parallel_iterations=1)[1:]

    @tf.custom_gradient
    def block(*block_weights):
        def forward(i, parts):
            # Slabs stacked along their first axis: z first, then concatenated.
            part = tf.transpose(slab(i * rows, block_weights), [1, 0, 2, 3, 4])
            return i + 1, parts.write(i, part)

        parts = tf.TensorArray(volume.dtype, size=slabs, infer_shape=False)
        (parts,) = loop(forward, (parts,))
        output = tf.transpose(parts.concat(), [1, 0, 2, 3, 4])

        def gradient(upstream):
            def backward(i, *sums):
                with tf.GradientTape() as tape:
                    tape.watch(block_weights)
                    part = slab(i * rows, block_weights)
                grads = tape.gradient(part, block_weights,
                                      output_gradients=upstream[:, i * rows:(i + 1) * rows])
                return i + 1, *(s + g for s, g in zip(sums, grads, strict=True))

            return list(loop(backward, [tf.zeros_like(w) for w in block_weights]))

        return output, gradient

    return block(*weights)


def compute_first_block_in_slabs(model: Any, tile_z: int) -> Any:
    """Make `model` compute its encoder's first block in z-slabs of `tile_z` voxels.

    Args:
        model: a classifier (its nested encoder is changed) or an encoder from `build_encoder`.
        tile_z: input rows per slab, even and >= 2; the full-resolution w-channel tensors of
            one slab hold tile_z + 2 rows.

    Returns:
        `model`, whose encoder now computes block 1 with `first_block_in_slabs` and the other
        layers as before. Only this object changes: not its config, weights or saved file.

    Raises:
        ModelError: tile_z is not an even integer >= 2, or the model has no encoder whose first
            block is the one `build_encoder` makes.
    """
    if isinstance(tile_z, bool) or not isinstance(tile_z, int) or tile_z < 2 or tile_z % 2:
        raise ModelError(f"expected tile_z to be an even integer >= 2, received {tile_z!r}")
    import keras

    encoder = model if model.name == ENCODER_NAME else _nested_encoder(model)
    chain = [name for block in range(1, ENCODER_BLOCKS + 1) for name in encoder_layer_names(block)]
    layers = [layer for layer in encoder.layers if not isinstance(layer, keras.layers.InputLayer)]
    if [layer.name for layer in layers] != chain:
        raise ModelError(f"expected an encoder of the layers {chain} in a chain, received "
                         f"{[layer.name for layer in layers]}")
    conv1, conv2, *rest = layers
    _check_first_block(conv1, conv2)

    def call(self, inputs, training=None, mask=None):
        x = keras.ops.cast(inputs, conv1.compute_dtype)
        # Cast to float32 (from the autocast weights, bf16 under mixed_bfloat16, as the plain
        # block reads them), so that the slabs' weight gradients are summed in float32.
        weights = tuple(keras.ops.cast(w, "float32")
                        for w in (conv1.kernel, conv1.bias, conv2.kernel, conv2.bias))
        x = first_block_in_slabs(x, weights, tile_z)
        for layer in rest:
            x = layer(x, training=training)
        return x

    # An attribute of this object, not of its class: Keras calls `self.call`, and saving reads
    # the layer graph, which is unchanged.
    encoder.call = types.MethodType(call, encoder)
    return model


def _nested_encoder(model: Any) -> Any:
    try:
        return model.get_layer(ENCODER_NAME)
    except ValueError:
        raise ModelError(
            f"expected a classifier with a nested '{ENCODER_NAME}' model, received model "
            f"'{model.name}' without it"
        ) from None
