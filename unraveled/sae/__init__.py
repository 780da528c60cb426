"""Sparse autoencoders with SAELens: training, evaluation, feature browser, attribution."""
