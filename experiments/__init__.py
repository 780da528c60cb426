"""Experiment modules, installed as ``unraveled.experiments``: each defines ``EXPERIMENT`` (see
``unraveled.experiment``).
"""
