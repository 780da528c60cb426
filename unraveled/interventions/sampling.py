"""How the next token is chosen while generating: greedy, or sampled with a seed.

Kept free of torch so that experiment params can use it (config validation imports no torch).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Sampling(BaseModel):
    """Greedy decoding, or sampling with TransformerLens's ``sample_logits``.

    Attributes:
        method: ``greedy`` (the most likely token) or ``sample``.
        temperature: Logits are divided by it before sampling (> 0).
        top_k: Sample among the k most likely tokens only.
        top_p: Sample among the most likely tokens holding this much probability (nucleus).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    method: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_filter(self) -> Sampling:
        if self.top_k is not None and self.top_p is not None:
            raise ValueError("top_k and top_p exclude each other (TransformerLens applies one)")
        if self.method == "greedy" and (
            self.top_k is not None or self.top_p is not None or self.temperature != 1.0
        ):
            raise ValueError("temperature, top_k and top_p apply to method 'sample' only")
        return self
