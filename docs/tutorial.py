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
# A result's figures are drawn on first use and show inline (`.figure` is the matplotlib
# figure). Its views draw inline too, offline: the first view a kernel shows carries circuitsvis's
# script, the later ones use it.

# %%
lens.figures[0]

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
# ## Your own pairs and your own metric
#
# The patching experiments take your own clean/corrupted pairs (each checked: one-token answers,
# equal token lengths) and, from Python, a metric in place of the logit difference: it gets the
# logits at each prompt's last token, `[batch, d_vocab]`, and the batch (`pairs.correct` and
# `pairs.incorrect` are the answers' token ids), and returns one score per prompt. Here: the
# log-probability of the clean answer.


# %%
def clean_answer_log_prob(last_logits, pairs):
    rows = torch.arange(last_logits.shape[0])
    return last_logits.log_softmax(-1)[rows, pairs.correct]


my_pairs = [
    {
        "clean": "The capital of France is the city of",
        "corrupted": "The capital of Italy is the city of",
        "clean_answer": " Paris",
        "corrupted_answer": " Rome",
    },
    {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Mary and John went to the store, Mary gave a drink to",
        "clean_answer": " Mary",
        "corrupted_answer": " John",
    },
]
custom = ur.run("activation_patching", model, pairs=my_pairs, metric=clean_answer_log_prob)
custom.metrics()["metric"]

# %%
custom.figures[1]

# %% [markdown]
# ## LayerNorm's gammas: raw weights
#
# The gammas exist only in the raw weights (processing folds them into the next layer).

# %%
norms = ur.run("layernorm", model, prompts=["The quick brown fox", "jumps over the lazy dog"])
norms.figures[1]

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
