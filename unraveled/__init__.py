"""unraveled: take GPT-2 apart and see how it works inside.

The data flow is one way: a YAML config (``unraveled.config``) names an experiment
(``experiments/``) and a model (``unraveled.models``); the experiment pulls activations
(``unraveled.activations``) and computes a result; its renderer draws figures and views; the
runner (``unraveled.runner``) owns every file written under ``outputs/``.
"""

__version__ = "0.1.0"
