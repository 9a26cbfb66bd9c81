"""kdsb: a Keras 3 / TensorFlow toolkit for 3D CT lung research.

DICOM series → lung-cropped HU volumes in HDF5 → Gaussian mixture convolutional autoencoder
(GMCAE) features → spatial-pyramid-pooling 3D CNN → per-patient p(cancer).

Importing kdsb is light: TensorFlow loads only when a model is built or Keras is imported.
Once kdsb is imported, `keras.saving.load_model(path)` loads kdsb models in safe mode.
Importing kdsb also quiets TensorFlow's C++ log lines (start-up: absl "I0000 …", oneDNN, CPU
feature notes; at run time: tf.data's "E0000 … use_unbounded_threadpool" and the like; see
`kdsb._tf_startup`) unless the user set `TF_CPP_MIN_LOG_LEVEL`: they hide the messages that
matter. `kdsb -v` lets them through.
It also turns TensorFlow's oneDNN kernels on unless `TF_ENABLE_ONEDNN_OPTS` is set: TensorFlow
leaves them off on some x86 CPUs (AMD EPYC here), where the 3D convolutions then ran 2.7×
(classifier) to 12–19× (GMCAE) slower; see benchmarks/README.md.
"""

import os

from kdsb._keras_hook import register_when_keras_loads
from kdsb._tf_startup import quiet_tensorflow_start_up
from kdsb._version import __version__

quiet_tensorflow_start_up()
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
register_when_keras_loads()

__all__ = ["__version__"]
