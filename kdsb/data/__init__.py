"""What models read: patches and whole volumes from kdsb HDF5 files as tf.data pipelines."""
