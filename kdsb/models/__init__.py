"""Keras models and their parts: layers, the mixture loss, the GMCAE and the classifier."""
