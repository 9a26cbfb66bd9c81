"""The Gaussian mixture negative log-likelihood that trains the GMCAE.

A patch t of c voxels is modelled as a mixture of m isotropic Gaussians,
p(t) = Σ_k α_k N(t | μ_k, σ_k² I). The loss is the negative log-likelihood per voxel,

    NLL = -logsumexp_k[ log α_k - (c/2)·log(2π σ_k²) - ‖t - μ_k‖² / (2σ_k²) ] / c,

computed in float32 whatever the inputs' dtype (mixed precision), with no variance floor here:
the floor belongs to the model's ShiftedELU head, so this function stays exact.

The model packs its parameters into one tensor of shape (batch, m·(2 + c)) laid out as
[log_priors (m) | variances (m) | means (m·c), component by component].
"""

from __future__ import annotations

import math

import keras
from keras import ops

LOG_2PI = math.log(2.0 * math.pi)

#: Dtype every loss computation runs in, also under mixed precision.
LOSS_DTYPE = "float32"


def gaussian_mixture_nll(targets, log_priors, variances, means):
    """Per-voxel negative log-likelihood of each target under its isotropic Gaussian mixture.

    Args:
        targets: (batch, c) flattened patches (normalised HU).
        log_priors: (batch, m) log mixture weights log α_k (log-softmax output).
        variances: (batch, m) variances σ_k² > 0, one per component (normalised HU²).
        means: (batch, m, c) component means μ_k, each a whole patch.

    Returns:
        (batch,) float32 NLL divided by c.
    """
    targets = ops.cast(targets, LOSS_DTYPE)
    log_priors = ops.cast(log_priors, LOSS_DTYPE)
    variances = ops.cast(variances, LOSS_DTYPE)
    means = ops.cast(means, LOSS_DTYPE)
    voxels = ops.cast(ops.shape(targets)[-1], LOSS_DTYPE)
    # The squared distance is summed from differences (not ‖t‖² - 2t·μ + ‖μ‖²) so far-apart,
    # nearly equal values do not cancel in float32.
    squared_distance = ops.sum(ops.square(ops.expand_dims(targets, 1) - means), axis=-1)
    log_components = (
        log_priors
        - 0.5 * voxels * (LOG_2PI + ops.log(variances))
        - squared_distance / (2.0 * variances)
    )
    return -ops.logsumexp(log_components, axis=-1) / voxels


def split_mixture_params(packed, mixtures: int):
    """Unpack (batch, m·(2 + c)) model output into mixture parameters.

    Args:
        packed: (batch, m·(2 + c)) laid out [log_priors (m) | variances (m) | means (m·c)], the
            means component by component, each a patch flattened in (z, y, x) C order.
        mixtures: m, the number of components.

    Returns:
        (log_priors (batch, m), variances (batch, m), means (batch, m, c)).

    Raises:
        ValueError: If m is not a whole number ≥ 1 (0 divided by zero) or the packed width is
            not m·(2 + c) for a whole c ≥ 1.
    """
    width = packed.shape[-1]
    if (isinstance(mixtures, bool) or not float(mixtures).is_integer() or mixtures < 1
            or width is None or width <= 2 * mixtures or (width - 2 * mixtures) % mixtures):
        raise ValueError(
            f"expected packed mixture parameters of width m·(2 + c) with m = {mixtures}, "
            f"received width {width}"
        )
    mixtures = int(mixtures)  # a NumPy integer or a whole float from a config
    voxels = (width - 2 * mixtures) // mixtures
    log_priors = packed[:, :mixtures]
    variances = packed[:, mixtures : 2 * mixtures]
    means = ops.reshape(packed[:, 2 * mixtures :], (-1, mixtures, voxels))
    return log_priors, variances, means


@keras.saving.register_keras_serializable(package="kdsb")
class GaussianMixtureNLL(keras.losses.Loss):
    """Keras loss wrapping `gaussian_mixture_nll` for a model with packed mixture output.

    y_true: patches of any shape (batch, ...), flattened to (batch, c) in C order.
    y_pred: packed parameters (batch, m·(2 + c)) as `split_mixture_params` reads them.
    The per-sample value is the NLL per voxel; Keras then applies the reduction.

    Args:
        mixtures: m, the number of mixture components.
        name: Loss name.
        **kwargs: Standard `keras.losses.Loss` arguments (reduction, dtype).
    """

    def __init__(self, mixtures: int, name: str = "gaussian_mixture_nll", **kwargs):
        super().__init__(name=name, **kwargs)
        self.mixtures = int(mixtures)

    def call(self, y_true, y_pred):
        targets = ops.reshape(y_true, (ops.shape(y_true)[0], -1))
        return gaussian_mixture_nll(targets, *split_mixture_params(y_pred, self.mixtures))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"mixtures": self.mixtures})
        return config
