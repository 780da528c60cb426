"""unraveled: take GPT-2 apart and see how it works inside.

The data flow is one way: a YAML config (``unraveled.config``) names an experiment
(``experiments/``) and a model (``unraveled.models``); the experiment pulls activations
(``unraveled.activations``) and computes a result; its renderer draws figures and views; the
runner (``unraveled.runner``) owns every file written under ``outputs/``.

From Python (``unraveled.api``, docs/python-api.md)::

    import unraveled as ur

    model = ur.load_model("gpt2")
    result = ur.run("logit_lens", model, prompt="The capital of France is")

The API's names are imported on first use: ``import unraveled`` stays cheap (config validation
and the command line import it, and must answer before torch is imported).
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# Interventions (docs/interventions.md): ``with ur.steer(model, vector, layer, coefficient):``.
_INTERVENTIONS = frozenset(
    [
        "Ablate",
        "AddVector",
        "Intervention",
        "contrastive_vector",
        "generate",
        "intervening",
        "steer",
    ]
)
__all__ = [
    "Ablate",
    "AddVector",
    "Intervention",
    "ParamError",
    "RunResult",
    "contrastive_vector",
    "generate",
    "intervening",
    "load_model",
    "provenance",
    "report",
    "run",
    "steer",
]

if TYPE_CHECKING:
    from unraveled.api import RunResult, load_model, provenance, report, run
    from unraveled.errors import ParamError
    from unraveled.interventions import (
        Ablate,
        AddVector,
        Intervention,
        contrastive_vector,
        generate,
        intervening,
        steer,
    )


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use."""
    if name == "ParamError":
        from unraveled.errors import ParamError

        return ParamError
    if name in _INTERVENTIONS:
        from unraveled import interventions

        return getattr(interventions, name)
    if name in __all__:
        from unraveled import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
