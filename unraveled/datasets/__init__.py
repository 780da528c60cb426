"""Prompt sets for the causal experiments."""
