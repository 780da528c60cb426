"""Experiment modules, installed as ``unraveled.experiments``.

Each defines ``EXPERIMENT`` (see ``unraveled.experiment``).
"""
