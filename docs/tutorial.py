# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # unraveled from a notebook
#
# Every experiment of `unraveled` is one call on a model you hold: the same params, checks and
# outputs as `unraveled run`, without a new process per prompt. This notebook loads GPT-2 small,
# runs four kinds of experiment on it, shows a figure and an interactive view inline, saves a
# run as the command line would, and rebuilds the report over it.
#
# Open it with `jupytext --to notebook docs/tutorial.py` (or in Jupyter with the jupytext
# extension). The reference for every call is [python-api.md](python-api.md). The test suite runs
# it top to bottom on a tiny model (`UNRAVELED_TUTORIAL_MODEL`); you run it on GPT-2 small.

# %%
import os

import unraveled as ur

MODEL = os.environ.get("UNRAVELED_TUTORIAL_MODEL", "gpt2")

# %% [markdown]
# ## Load a model once
#
# `ur.load_model` loads a model as the command line does: through the converted-weights cache
# (the second load of a model takes seconds), with processed weights by default (LayerNorm
# folded, writing weights centred: `HookedTransformer.from_pretrained`'s defaults). It is a
# plain `HookedTransformer`; `ur.provenance` says where it came from. Any `HookedTransformer`
# you load yourself works too.

# %%
model = ur.load_model(MODEL)
ur.provenance(model)

# %% [markdown]
# ## The logit lens on your prompt
#
# Keyword arguments are the experiment's params (`unraveled params logit_lens` lists them),
# checked as the command line checks them: a prompt longer than the experiment takes, a head
# the model doesn't have, an answer that is two tokens raise `ur.ParamError` naming the param.

# %%
lens = ur.run("logit_lens", model, prompt="The Eiffel Tower is in the city of")
lens

# %%
lens.metrics()["final_prediction"]

# %% [markdown]
# A result's figures are matplotlib figures, drawn on first use; each shows inline.

# %%
lens.figures[0].figure

# %% [markdown]
# ## Attention patterns: an interactive view
#
# `attention` reads the checkpoint's raw weights. The model above holds processed ones, so the
# raw weights are read again from the same source for this call (and the run's provenance says
# so): the numbers never depend on how you loaded the model. A model you loaded yourself with
# processed weights is refused instead, with the line that loads raw ones.
#
# The head may come straight from a tensor (`scores.argmax()`): integer numpy and torch scalars
# are taken as ints.

# %%
import torch

head = torch.tensor(1)
attention = ur.run("attention", model, head=head)
attention.model["weights_note"]

# %%
attention.views[0]

# %% [markdown]
# ## Activation patching
#
# How much of the logit difference between " Mary" and " John" each residual-stream position
# and each head recovers when its clean activation is patched into the corrupted run.

# %%
patching = ur.run(
    "activation_patching",
    model,
    clean="When Mary and John went to the store, John gave a drink to",
    corrupted="When Mary and John went to the store, Mary gave a drink to",
    clean_answer=" Mary",
    corrupted_answer=" John",
)
patched = patching.metrics()
patched["clean_logit_difference"], patched["corrupted_logit_difference"]

# %% [markdown]
# ## LayerNorm's gammas: raw weights
#
# The gammas exist only in the raw weights (processing folds them into the next layer).

# %%
norms = ur.run("layernorm", model, prompts=["The quick brown fox", "jumps over the lazy dog"])
norms.figures[1].figure

# %% [markdown]
# ## Save a run, rebuild the report
#
# `save` writes exactly the folder `unraveled run` writes (`OUT/<model>/<experiment>/`: figures,
# views, `metrics.json`, `manifest.json` recording the params given here as overrides), and
# rebuilds the report's pages. `ur.report` (or `unraveled report OUT`) rebuilds them over every
# run in the folder.

# %%
saved = lens.save("tutorial-outputs")
attention.save("tutorial-outputs")
sorted(path.name for path in saved.iterdir())

# %%
ur.report("tutorial-outputs")
