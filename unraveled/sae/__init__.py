"""Sparse autoencoders with SAELens: training, evaluation, browsing and attribution."""
