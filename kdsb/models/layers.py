"""kdsb's custom Keras layers: ShiftedELU (positive variances) and 3D spatial pyramid pooling.

Both layers are registered for serialization under the package name "kdsb", so saved models load
with plain `keras.saving.load_model(path)` (safe mode) once `kdsb` is imported. Only `keras.ops`
is used in `call`; tensors are channels-last, spatial axes in (z, y, x) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

#: Default amount ShiftedELU adds on top of ELU + 1, so its output (a variance) is never 0: the
#: GMCAE's variance floor (normalised HU²; σ ≥ 0.03 ≈ 22 HU). It keeps the per-voxel NLL bounded
#: below and the gradients of a nearly perfect component finite.
DEFAULT_VARIANCE_FLOOR = 1e-3

#: Pooling reductions SpatialPyramidPooling3D understands.
POOLING_MODES = ("max", "average")

#: Default pyramid: 1³ + 2³ + 4³ = 73 bins per channel.
DEFAULT_LEVELS = (1, 2, 4)


@keras.saving.register_keras_serializable(package="kdsb")
class ShiftedELU(keras.layers.Layer):
    """ELU(x) + 1 + floor: a smooth, strictly positive activation for mixture variances.

    For x > 0 the output is x + 1 + floor, for x ≤ 0 it is exp(x) + floor. ELU + 1 is written as
    exp(x) on the negative side (rather than (exp(x) - 1) + 1) so small values are not lost to
    cancellation; the output therefore never drops below `floor`, even for very negative inputs.

    Args:
        floor: Smallest output value (> 0), in the squared units of the modelled data
            (normalised HU² for the GMCAE).
        **kwargs: Standard Keras layer arguments (name, dtype, ...).

    Raises:
        ValueError: If floor is not a finite positive number.
    """

    def __init__(self, floor: float = DEFAULT_VARIANCE_FLOOR, **kwargs):
        super().__init__(**kwargs)
        if not 0 < floor < float("inf"):  # an infinite floor gives infinite variances
            raise ValueError(f"ShiftedELU: expected a finite floor > 0, received {floor!r}")
        self.floor = float(floor)

    def call(self, inputs):
        positive = inputs + 1.0
        negative = ops.exp(ops.minimum(inputs, 0.0))
        return ops.where(inputs > 0, positive, negative) + self.floor

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"floor": self.floor})
        return config


def _bin_bounds(length, bins: int, index: int):
    """Start and size of bin `index` of `bins` over `length`: [floor(i·L/n), ceil((i+1)·L/n)).

    Works on Python ints and on scalar integer tensors (unknown spatial sizes). Bins are never
    empty: when length < bins, neighbouring bins overlap or repeat the same voxels.
    """
    start = (index * length) // bins
    stop = ((index + 1) * length + bins - 1) // bins
    return start, stop - start


@keras.saving.register_keras_serializable(package="kdsb")
class Log1p(keras.layers.Layer):
    """log(1 + x), element-wise, for inputs > -1 (the classifier's pooled ReLU features, ≥ 0).

    A layer of its own because a Keras Lambda layer does not load in safe mode.
    """

    def call(self, inputs):
        return ops.log1p(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="kdsb")
class SpatialPyramidPooling3D(keras.layers.Layer):
    """3D spatial pyramid pooling: a fixed-length vector from a volume of any size.

    Input (batch, z, y, x, channels), spatial sizes may be unknown (None) and differ between
    calls. For every level n the volume is split into n × n × n bins; bin i of n along an axis of
    length L spans [floor(i·L/n), ceil((i+1)·L/n)) (never empty, overlapping when L < n), and each
    bin is reduced by max or mean per channel.

    Output feature order: levels in the given order; within a level, bins in C order
    (z bin slowest, then y, then x), and channels fastest. So for level n the feature of bin
    (iz, iy, ix) and channel ch sits at offset + ((iz·n + iy)·n + ix)·channels + ch, where offset
    is channels · Σ(previous levels' n³).

    Both reductions are separable over a box (a max or mean over a product of ranges equals the
    reduction along z, then y, then x), so each level costs 3·n dynamic slices instead of n³ — a
    hand-written loop because Keras has no pooling layer with these overlapping, never-empty bins.

    Args:
        levels: Bins per axis at each pyramid level, each ≥ 1.
        pooling: "max" or "average".
        **kwargs: Standard Keras layer arguments (name, dtype, ...).

    Raises:
        ValueError: If levels is empty or holds a value < 1, or pooling is unknown.
    """

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS, pooling: str = "max", **kwargs):
        super().__init__(**kwargs)
        levels = tuple(int(n) for n in levels)
        if not levels or min(levels) < 1:
            raise ValueError(
                f"SpatialPyramidPooling3D: expected levels of integers ≥ 1, received {levels!r}"
            )
        if pooling not in POOLING_MODES:
            raise ValueError(
                f"SpatialPyramidPooling3D: expected pooling in {POOLING_MODES}, "
                f"received {pooling!r}"
            )
        self.levels = levels
        self.pooling = pooling
        self.input_spec = keras.layers.InputSpec(ndim=5)

    @property
    def bins_per_channel(self) -> int:
        """Number of output features per input channel, Σ n³ over the levels."""
        return sum(n**3 for n in self.levels)

    def _reduce(self, x, axis: int):
        if self.pooling == "max":
            return ops.max(x, axis=axis, keepdims=True)
        return ops.mean(x, axis=axis, keepdims=True)

    def _pool_axis(self, x, axis: int, bins: int):
        """Reduce `x` along `axis` into `bins` bins (the axis then has length `bins`)."""
        shape = ops.shape(x)
        length = shape[axis]
        pooled = []
        for i in range(bins):
            start, size = _bin_bounds(length, bins, i)
            starts = [0] * 5
            starts[axis] = start
            sizes = list(shape)
            sizes[axis] = size
            pooled.append(self._reduce(ops.slice(x, starts, sizes), axis))
        return pooled[0] if bins == 1 else ops.concatenate(pooled, axis=axis)

    def call(self, inputs):
        channels = inputs.shape[-1]
        features = []
        for n in self.levels:
            x = inputs
            for axis in (1, 2, 3):
                x = self._pool_axis(x, axis, n)
            features.append(ops.reshape(x, (-1, n**3 * channels)))
        return features[0] if len(features) == 1 else ops.concatenate(features, axis=-1)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        features = None if channels is None else channels * self.bins_per_channel
        return (input_shape[0], features)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"levels": list(self.levels), "pooling": self.pooling})
        return config
