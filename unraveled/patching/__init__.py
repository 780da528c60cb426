"""The patching core of the causal experiments: exact patches, their gradient estimates, edges.

Every function runs on a batch of prompt pairs (``PromptPairs``: clean and corrupted prompts of
equal length per pair, each prompt's last token and two answers) and scores runs by a metric of
the logits at each prompt's last token, the logit difference of the correct over the incorrect
answer unless another is given (``metrics``).

- ``activation``: exact activation patching, many patch sets at once (``patched_metric``).
- ``attribution``: attribution patching, every patch estimated from one gradient
  (``attribution``).
- ``edges``: edge attribution patching, a score for every edge between components
  (``edge_attribution``).
- ``circuits``: edge-level faithfulness, a circuit's edges alone carrying clean information
  (``edge_circuit_metric``).
- ``patches`` says what a patch is in hooks; ``pairs`` holds the batch.
"""

from unraveled.patching.activation import MAX_ROWS, patched_metric
from unraveled.patching.attribution import (
    GRADIENT_TOKENS,
    attribution,
    estimates_per_component,
    gradient_passes,
)
from unraveled.patching.circuits import (
    EDGE_BUFFER_BYTES,
    CircuitPass,
    circuit_hooks,
    edge_circuit_metric,
    edge_circuit_passes,
)
from unraveled.patching.edges import (
    EdgeScores,
    downstream_names,
    edge_attribution,
    output_hooks,
    upstream_names,
)
from unraveled.patching.metrics import (
    Metric,
    Recovery,
    answer_summary,
    last_token_logits,
    logit_difference,
    logit_differences,
)
from unraveled.patching.pairs import (
    CHANGE_GROUPS,
    Cache,
    PromptPairs,
    Which,
    position_groups,
    run_cache,
    single_pair,
    user_pairs,
)
from unraveled.patching.patches import (
    Patch,
    component_patches,
    embedding_hooks,
    head_patches,
    hook_layer,
    mlp_patches,
    patchable_hooks,
    residual_patches,
    split_head_inputs,
)

__all__ = [
    "CHANGE_GROUPS",
    "EDGE_BUFFER_BYTES",
    "GRADIENT_TOKENS",
    "MAX_ROWS",
    "Cache",
    "CircuitPass",
    "EdgeScores",
    "Metric",
    "Patch",
    "PromptPairs",
    "Recovery",
    "Which",
    "answer_summary",
    "attribution",
    "circuit_hooks",
    "component_patches",
    "downstream_names",
    "edge_attribution",
    "edge_circuit_metric",
    "edge_circuit_passes",
    "embedding_hooks",
    "estimates_per_component",
    "gradient_passes",
    "head_patches",
    "hook_layer",
    "last_token_logits",
    "logit_difference",
    "logit_differences",
    "mlp_patches",
    "output_hooks",
    "patchable_hooks",
    "patched_metric",
    "position_groups",
    "residual_patches",
    "run_cache",
    "single_pair",
    "split_head_inputs",
    "upstream_names",
    "user_pairs",
]
