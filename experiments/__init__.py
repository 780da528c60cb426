"""Experiment modules: each defines ``EXPERIMENT`` (see ``unraveled.experiment``)."""
