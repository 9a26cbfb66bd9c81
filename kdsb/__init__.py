"""kdsb: a Keras 3 / TensorFlow toolkit for 3D CT lung research.

DICOM series → lung-cropped HU volumes in HDF5 → Gaussian mixture convolutional autoencoder
(GMCAE) features → spatial-pyramid-pooling 3D CNN → per-patient p(cancer).

Importing kdsb is light: TensorFlow loads only when a model is built or Keras is imported.
Once kdsb is imported, `keras.saving.load_model(path)` loads kdsb models in safe mode.
Importing kdsb also quiets TensorFlow's C++ start-up lines (absl "I0000 …", oneDNN, CPU feature
notes) unless `TF_CPP_MIN_LOG_LEVEL` is already set: they hide the messages that matter.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kdsb._keras_hook import register_when_keras_loads
from kdsb._version import __version__

register_when_keras_loads()

__all__ = ["__version__"]
