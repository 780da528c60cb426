"""Train an SAE with SAELens's trainer on a stream of activations, in memory flat in its length.

The activations come as an iterator of ``[token, d_in]`` chunks (``unraveled.sae.activations``
or synthetic ones); SAELens's ``mixing_buffer`` shuffles them through a buffer of a fixed number
of tokens into training batches, and ``SAETrainer`` (SAELens's training loop, fed from that
iterator instead of a Hugging Face dataset) trains a ``standard`` (ReLU + L1), ``topk`` or
``batchtopk`` SAE on them. The result is SAELens's inference ``SAE``, made by saving the trained
SAE in SAELens's format and loading it back, so it is exactly what ``SAE.load_from_disk`` gives.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.mixing_buffer import mixing_buffer
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

Architecture = Literal["standard", "topk", "batchtopk"]
ARCHITECTURES: tuple[Architecture, ...] = ("standard", "topk", "batchtopk")


@dataclass(frozen=True)
class TrainSettings:
    """How to train: the SAE's shape and sparsity, the optimiser, the buffer.

    Attributes:
        architecture: ``standard`` (ReLU, L1 penalty), ``topk`` (the k largest per token) or
            ``batchtopk`` (k per token on average over a batch; saved as a JumpReLU SAE).
        d_sae: Features (the SAE's width).
        k: Active features per token (``topk``, ``batchtopk``).
        l1_coefficient: The L1 penalty's weight (``standard``).
        training_tokens: Distinct activations read from the stream and trained on.
        batch_tokens: Activations per optimiser step.
        buffer_tokens: Activations held in the shuffling buffer: memory does not grow beyond it.
        passes: Times each activation is trained on: the stream is read ``buffer_tokens`` at a
            time and each such block is fed to the buffer ``passes`` times (reshuffled), so
            activations that are expensive to generate are reused while memory stays flat.
        lr: Adam's learning rate (constant after a warm-up of a tenth of the steps).
        norm_batches: Batches read to estimate the activations' mean norm, which SAELens scales
            to sqrt(d_in) while training and folds into the saved weights.
    """

    architecture: Architecture
    d_sae: int
    k: int
    l1_coefficient: float
    training_tokens: int
    batch_tokens: int
    buffer_tokens: int
    lr: float
    norm_batches: int = 4
    passes: int = 1

    @property
    def steps(self) -> int:
        """Optimiser steps: the training tokens, each ``passes`` times, in whole batches.

        With ``passes`` above 1, less the batches the scale estimate reads and the half buffer
        SAELens's mixing buffer keeps back, so that training reads no activation beyond the
        first ``training_tokens`` (rounded up to whole buffers): they are the expensive part.
        """
        if self.passes == 1:
            return self.training_tokens // self.batch_tokens
        reused = self.training_tokens * self.passes - self.buffer_tokens // 2
        return max(1, reused // self.batch_tokens - self.norm_batches)


def training_sae(
    settings: TrainSettings, d_in: int, metadata: dict[str, Any], seed: int
) -> TrainingSAE[Any]:
    """A freshly initialised SAELens training SAE of ``settings``' architecture, seeded.

    Args:
        settings: Architecture, width, sparsity.
        d_in: The activations' dimension.
        metadata: SAELens metadata saved with the SAE (``model_name``, ``hook_name``, ...).
        seed: Seeds the initial weights.
    """
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": settings.d_sae,
        "normalize_activations": "expected_average_only_in",
        "metadata": SAEMetadata(**metadata),
    }
    sae: TrainingSAE[Any]
    torch.manual_seed(seed)
    if settings.architecture == "standard":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(**common, l1_coefficient=settings.l1_coefficient)
        )
    elif settings.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=settings.k))
    elif settings.architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=settings.k))
    else:
        raise ValueError(f"architecture={settings.architecture!r}; expected one of {ARCHITECTURES}")
    return sae


def training_batches(
    chunks: Iterator[Float[Tensor, "token d_in"]], settings: TrainSettings
) -> Iterator[Float[Tensor, "batch d_in"]]:
    """``chunks`` shuffled through SAELens's fixed-size mixing buffer into training batches.

    The buffer holds at most ``buffer_tokens`` activations plus one chunk (and, with ``passes``
    above 1, one block of ``buffer_tokens`` being reused): memory is flat in the number of tokens
    streamed. The shuffle draws from torch's global generator (seeded by the run).
    """
    if settings.passes > 1:
        chunks = reused_blocks(chunks, settings.buffer_tokens, settings.passes)
    return mixing_buffer(settings.buffer_tokens, settings.batch_tokens, chunks)


def reused_blocks(
    chunks: Iterator[Float[Tensor, "token d_in"]], block_tokens: int, passes: int
) -> Iterator[Float[Tensor, "token d_in"]]:
    """``chunks`` gathered into blocks of at least ``block_tokens``, each yielded ``passes`` times.

    The last block may be shorter. One block is held at a time, so memory is flat in the stream's
    length; the mixing buffer downstream reshuffles each repetition.
    """
    gathered: list[Tensor] = []
    held = 0
    for chunk in chunks:
        gathered.append(chunk)
        held += len(chunk)
        if held >= block_tokens:
            block = torch.cat(gathered)
            gathered, held = [], 0
            for _ in range(passes):
                yield block
    if gathered:
        block = torch.cat(gathered)
        for _ in range(passes):
            yield block


def train_sae(
    chunks: Iterator[Float[Tensor, "token d_in"]],
    d_in: int,
    settings: TrainSettings,
    metadata: dict[str, Any],
    seed: int,
) -> SAE[Any]:
    """Train an SAE on ``chunks`` with SAELens's ``SAETrainer``; SAELens's inference SAE back.

    Args:
        chunks: Activations, ``[token, d_in]`` at a time; at least ``training_tokens`` plus the
            ``norm_batches`` the scale estimate reads (an endless stream is fine: it is read only
            as far as needed).
        d_in: The activations' dimension.
        settings: What to train and for how long.
        metadata: SAELens metadata saved with the SAE (``model_name``, ``hook_name``, ...).
        seed: Seeds the initial weights and the buffer's shuffle.

    Raises:
        ValueError: The stream ended before ``training_tokens`` were read.
    """
    sae = training_sae(settings, d_in, metadata, seed)
    torch.manual_seed(seed)
    batches = _counted(training_batches(chunks, settings), settings)
    trainer: SAETrainer[Any, Any] = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=settings.steps * settings.batch_tokens,
            train_batch_size_samples=settings.batch_tokens,
            lr=settings.lr,
            lr_end=settings.lr,
            lr_warm_up_steps=settings.steps // 10,
            device="cpu",
            # Sparsity windows in steps; a feature unseen for a fifth of the run is dead to the
            # TopK auxiliary loss, which then trains it on the residual error.
            dead_feature_window=max(1, settings.steps // 5),
            feature_sampling_window=max(1, settings.steps),
            logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=settings.norm_batches,
        ),
        sae=sae,
        data_provider=batches,
    )
    trainer.fit()
    return inference_sae(trainer.sae)


def _counted(
    batches: Iterator[Float[Tensor, "batch d_in"]], settings: TrainSettings
) -> Iterator[Float[Tensor, "batch d_in"]]:
    read = 0
    for batch in batches:
        read += 1
        yield batch
    raise ValueError(
        f"the activations ran out after {read} batches of {settings.batch_tokens} tokens; "
        f"training needs {settings.steps} (+ {settings.norm_batches} for the scale estimate)"
    )


def inference_sae(trained: TrainingSAE[Any]) -> SAE[Any]:
    """SAELens's inference SAE of ``trained``: saved in SAELens's format and loaded back."""
    with tempfile.TemporaryDirectory(prefix="unraveled-sae-") as folder:
        trained.save_inference_model(folder)
        return SAE.load_from_disk(folder)
