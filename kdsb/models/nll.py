"""The GMCAE's own likelihood as a detector: how unusual each patch of a volume is.

A GMCAE trained without labels on lung patches explains ordinary lung well (low negative
log-likelihood, NLL) and what it rarely saw badly: a nodule or mass should be among a patient's
most unusual patches. `PatchMixtureNLL` tiles a prepared volume with the GMCAE's patches
(edge P voxels, stride `stride`, the patches that fit whole) and returns each patch's mixture
NLL per voxel (the GMCAE's training loss), one instance per patch: the bag that the MIL head
(`kdsb.models.mil`, `--head nll`) pools, max or attention, into p(cancer). With the classifier's
default input the voxels outside the lung mask are lung parenchyma, so patches off the lungs are
plain and rank low.

The layer holds the trained GMCAE (frozen) and runs it on at most `chunk` patches at a time, so
memory stays bounded on 1 mm volumes (thousands of patches).
"""

from __future__ import annotations

import keras
from keras import ops

# A module reference, not its names: this module loads while kdsb.models.losses may still be
# initialising (both are imported when Keras loads, `kdsb._keras_hook`).
from kdsb.models import losses

DEFAULT_CHUNK = 256


@keras.saving.register_keras_serializable(package="kdsb")
class PatchMixtureNLL(keras.layers.Layer):
    """Per-patch GMCAE mixture NLL of a volume.

    Input: (batch, z, y, x, 1) normalised HU (each axis at least the patch edge).
    Output: (batch, n, 1) float32 NLL per voxel (nats) of the n = Π (⌊(axis − P) / stride⌋ + 1)
    patches of each volume, in (z, y, x) C order of their corners.

    Args:
        gmcae: a GMCAE (`kdsb.models.gmcae.build_gmcae`); frozen here.
        stride: voxels between neighbouring patches (P: no overlap; P // 2: half).
        chunk: at most this many patches per GMCAE call.
        **kwargs: standard Keras layer arguments.
    """

    def __init__(self, gmcae: keras.Model, stride: int, chunk: int = DEFAULT_CHUNK, **kwargs):
        super().__init__(**kwargs)
        from kdsb.models.gmcae import mixtures_of

        self.gmcae = gmcae
        self.gmcae.trainable = False
        self.patch_size = int(gmcae.input_shape[1])
        self.mixtures = mixtures_of(gmcae)
        self.stride = int(stride)
        self.chunk = int(chunk)
        if not 1 <= self.stride <= self.patch_size or self.chunk < 1:
            raise ValueError(f"PatchMixtureNLL: expected 1 <= stride <= {self.patch_size} and "
                             f"chunk >= 1, received stride {stride}, chunk {chunk}")

    def call(self, volume):
        import tensorflow as tf  # kdsb runs Keras on TensorFlow

        size = self.patch_size
        # TensorFlow's own patch extraction, not `ops.image.extract_patches_3d`: Keras 3.15's
        # convolves with a P³ × P³ identity kernel (4.3 GB at P = 32, built on every call; 100×
        # slower at P = 24). The same values in the same order.
        patches = tf.extract_volume_patches(
            ops.cast(volume, "float32"), ksizes=[1, size, size, size, 1],
            strides=[1, self.stride, self.stride, self.stride, 1], padding="VALID",
        )  # (batch, nz, ny, nx, P³) with each patch flattened in (z, y, x) C order
        flat = ops.reshape(patches, (-1, size**3))
        count = ops.shape(flat)[0]
        # The fewest chunks of at most `chunk` patches, all of one size: fewer padding patches
        # than chunks (padding to a whole `chunk` ran 256 patches through the GMCAE for 27).
        chunks = (count + self.chunk - 1) // self.chunk
        per_chunk = (count + chunks - 1) // chunks
        padded = ops.pad(flat, [[0, chunks * per_chunk - count], [0, 0]])

        def nll_of(chunk):
            packed = self.gmcae(ops.reshape(chunk, (-1, size, size, size, 1)), training=False)
            return losses.gaussian_mixture_nll(
                chunk, *losses.split_mixture_params(packed, self.mixtures))

        # tf.map_fn with the output's signature given: Keras' `ops.map` first runs one chunk
        # through the GMCAE only to learn that signature (a second pass of an eager call).
        nll = tf.map_fn(nll_of, ops.reshape(padded, (chunks, per_chunk, size**3)),
                        fn_output_signature=tf.TensorSpec((None,), "float32"))
        # Patches are in (volume, z, y, x) C order: each volume's come together.
        return ops.reshape(ops.reshape(nll, (-1,))[:count], (ops.shape(volume)[0], -1, 1))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, 1)

    def get_config(self):
        return {
            **super().get_config(),
            "gmcae": keras.saving.serialize_keras_object(self.gmcae),
            "stride": self.stride,
            "chunk": self.chunk,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["gmcae"] = keras.saving.deserialize_keras_object(config["gmcae"])
        return cls(**config)


def patch_nll_features(gmcae: keras.Model, stride: int | None = None) -> keras.Model:
    """Volumes (batch, z, y, x, 1) → per-patch NLL instances (batch, n, 1), by a frozen copy of
    `gmcae`.

    Args:
        gmcae: a trained GMCAE (copied: training the classifier never changes it).
        stride: patch stride in voxels (None: half the patch edge).
    """
    from kdsb.models.classifier import CLASSIFIER_INPUT_SHAPE

    def in_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        # A plain clone keeps each layer's saved policy: a bfloat16 GMCAE gave a float32 run
        # 16-bit likelihoods (found in review; `recursive`: the nested encoder's layers too,
        # found in a later review). A likelihood is scored in float32 whatever precision the
        # GMCAE trained in or the run uses.
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(gmcae, clone_function=in_float32, recursive=True)
    copy.set_weights(gmcae.get_weights())
    size = int(gmcae.input_shape[1])
    volume = keras.Input(shape=CLASSIFIER_INPUT_SHAPE[1:], name="volume")
    # float32 itself too: under a mixed policy Keras would round its input to 16 bits first.
    layer = PatchMixtureNLL(copy, stride or max(1, size // 2), name="patch_nll", dtype="float32")
    return keras.Model(volume, layer(volume), name="patch_nll_features")


def smallest_input(model: keras.Model) -> int:
    """Voxels per axis of the network input that `model` needs: the GMCAE patch of its
    `PatchMixtureNLL` (an nll head's features, nested in a saved classifier), else 1."""
    for layer in model.layers:
        if isinstance(layer, PatchMixtureNLL):
            return int(layer.patch_size)
        if isinstance(layer, keras.Model):
            found = smallest_input(layer)
            if found > 1:
                return found
    return 1


def check_holds_a_patch(path, network_shape, size: int) -> None:
    """Refuse a volume whose network input (z, y, x voxels) has an axis shorter than the
    GMCAE's patch of `size` voxels, naming the file, rather than fail inside TensorFlow (no
    patch fits: nothing to score).

    Raises:
        StoreError: naming the file and the shape.
    """
    from kdsb.errors import StoreError

    if min(network_shape) < size:
        raise StoreError(f"{path}: expected every axis at least the GMCAE's patch of {size} "
                         f"voxels (head nll), received a network input of "
                         f"{'×'.join(map(str, network_shape))} (z, y, x)")
