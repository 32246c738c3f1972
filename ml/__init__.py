"""Conflict prediction: features, training, the online scorer, the model registry."""
