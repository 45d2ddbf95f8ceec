"""Keras 3 network builders shared by the node and by training."""
