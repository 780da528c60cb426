"""Sparse autoencoders (SAEs) with SAELens: train one on a hook's activations, load, keep, evaluate.

The SAE everywhere is SAELens's own ``sae_lens.SAE``; functions take the model, the SAE, the hook
name and token windows. ``activations`` streams a hook's activations from corpus windows (locally
or on Ray) in bounded memory, ``training`` trains an SAE on them with SAELens's trainer,
``loading`` loads pretrained or saved SAEs and checks them against a model, ``planted`` is the
known-answer check: sparse features planted in superposition, and how many an SAE recovers.

Importing this package imports neither torch nor SAELens.
"""
