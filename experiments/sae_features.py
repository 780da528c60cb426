"""SAE features: a sparse autoencoder on one hook, trained with SAELens on a corpus, or loaded.

Trained: SAELens's training code on the hook's activations over the corpus atlas's windows
(streamed through a fixed-size buffer, generated locally or on Ray), saved in the run folder in
SAELens's format. Loaded: a pretrained SAELens release and id, or a saved folder; either way
checked against the model and hook before anything is written. Some windows are held out of
training for the evaluation. Each training run also trains the same kind of SAE on planted
sparse features in superposition, the known answer that says the training recovers features.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from pydantic import Field, field_validator, model_validator

from unraveled.corpus import BUNDLED_PLAYS, MARKDOWN_HANDLING, checked_corpus_sources
from unraveled.errors import ConfigError
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
    Saved,
    Table,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

    from unraveled.sae.attribution import FeatureAttribution
    from unraveled.sae.browser import FeatureBrowserData
    from unraveled.sae.evaluation import SAEEvaluation

# Validating a config imports this module: torch, SAELens and TransformerLens are imported inside
# the functions that need them.
MAX_CONTEXT_TOKENS = 1024
MAX_WIDTH = 1 << 17
MAX_TOKENS = 1 << 30
SAVED_FOLDER = "sae"
BROWSER_PAGE = "feature_browser"
# The known answer (issue 22.5): 64 sparse directions in 16 dimensions, each firing on 3% of
# samples; an SAE recovers a direction when one of its decoder directions has cosine > 0.9.
PLANTED_FEATURES = 64
PLANTED_DIMS = 16
PLANTED_FIRING = 0.03
PLANTED_WIDTH = 128
# k = 4, not 2: at k = 2 (about 1.9 features fire per sample, 3 or more on 30% of them)
# the recovered count moved with the seed from 56 to 61 of 64, under 90% at two of eight seeds;
# at k = 4, 60 to 64 over seeds 0-7, in the same time.
PLANTED_K = 4
PLANTED_SAMPLES = 150_000
PLANTED_BATCH = 512
PLANTED_LR = 1e-2
PLANTED_L1 = 1.0
# Prompts per exactly patched forward pass: each holds full [prompts, positions, d_vocab] logits
# (49,152 tokens on SmolLM2), so the patching's default of 64 rows peaked 126 MiB above 16.
# A pass holds at least one copy of every pair, so above 16 attribution pairs it holds them all.
ATTRIBUTION_ROWS = 16
DEFINITIONS = {
    "activations": (
        "the hook's activations at the counted window positions (unraveled.sae.positions): not "
        "the BOS the model prepends to each window (the same in every window, with outsized "
        "activations), nor any of the tokenizer's special tokens (BOS, EOS, PAD, SEP, "
        "decoder-start: SAELens's exclude_special_tokens); a feature is active where its "
        "activation is != 0"
    ),
    "held_out": (
        "eval_tokens worth of whole windows, a seeded choice among the run's windows, never "
        "trained on; the rest are the training windows, streamed again from the start when "
        "training needs more tokens than they hold"
    ),
    "normalisation": (
        "SAELens's expected_average_only_in: activations scaled to mean norm sqrt(d_in) while "
        "training (the scale estimated from the first batches), folded into the saved weights, "
        "so the saved SAE takes the model's activations as they are"
    ),
    "planted_recovery": (
        f"{PLANTED_FEATURES} unit directions in {PLANTED_DIMS} dimensions, pushed apart as far "
        "as they go (SAELens's synthetic FeatureDictionary, orthogonalised), each firing "
        f"independently on {PLANTED_FIRING:.0%} of samples with magnitude 1 +- 0.1; an SAE of "
        f"the run's architecture and {PLANTED_WIDTH} features trained on them; a planted "
        "direction is recovered when the largest cosine with any decoder direction is above 0.9"
    ),
    "corpus_markup": MARKDOWN_HANDLING,
}


class PretrainedSource(Params):
    """A pretrained SAE from SAELens's directory: ``SAE.from_pretrained(release, id)``."""

    release: str = Field(min_length=1, description="SAELens release, e.g. gpt2-small-res-jb.")
    id: str = Field(
        min_length=1, description="SAE id in the release, e.g. blocks.8.hook_resid_pre."
    )


class LocalSource(Params):
    """An SAE saved in SAELens's format: ``SAE.load_from_disk(path)``."""

    path: str = Field(min_length=1, description="Folder with cfg.json and sae_weights.safetensors.")


class SaeFeaturesParams(Params):
    """Which SAE (trained here, or loaded), on which hook, over which corpus."""

    source: PretrainedSource | LocalSource | None = Field(
        None,
        description=(
            "null trains an SAE here; {release, id} loads a SAELens pretrained SAE; {path} "
            "loads a folder saved in SAELens's format (e.g. an earlier run's sae/)."
        ),
    )
    hook: str | None = Field(
        None,
        description=(
            "Hook point; null is the loaded SAE's own hook, or for training the residual stream "
            "entering the middle block (blocks.{n_layers // 2}.hook_resid_pre)."
        ),
    )
    architecture: Literal["standard", "topk", "batchtopk"] = Field(
        "topk",
        description=(
            "standard: ReLU with an L1 penalty; topk: the k largest per token; batchtopk: k per "
            "token on average over a batch (saved as a JumpReLU SAE). SAELens's classes."
        ),
    )
    width: int = Field(1024, ge=2, le=MAX_WIDTH, description="Features (d_sae).")
    k: int = Field(16, ge=1, description="Active features per token (topk, batchtopk).")
    l1_coefficient: float = Field(5.0, gt=0, description="L1 penalty weight (standard).")
    training_tokens: int = Field(
        16384,
        ge=1,
        le=MAX_TOKENS,
        description="Distinct activations generated and trained on (the slow part: forwards).",
    )
    passes: int = Field(
        8,
        ge=1,
        le=1024,
        description=(
            "Times each generated activation is trained on (reused a buffer at a time, so memory "
            "stays flat); 1 generates a fresh activation for every training token."
        ),
    )
    batch_tokens: int = Field(512, ge=1, le=1 << 16, description="Activations per step.")
    buffer_tokens: int = Field(
        8192,
        ge=1,
        le=1 << 24,
        description="Shuffling buffer (activations held at once: memory flat in training_tokens).",
    )
    lr: float = Field(4e-3, gt=0, le=1, description="Adam learning rate.")
    eval_tokens: int = Field(
        2048, ge=1, le=MAX_TOKENS, description="Held-out tokens (whole windows) never trained on."
    )
    corpus: list[str] = Field(
        default_factory=list,
        description=(
            "Text files, folders or globs (.txt, .md, .jsonl with 'text'); [] is the bundled "
            f"{BUNDLED_PLAYS} plays."
        ),
    )
    context_tokens: int = Field(128, ge=2, le=MAX_CONTEXT_TOKENS, description="Tokens per window.")
    sample: Literal["spread", "first"] = Field(
        "spread",
        description=(
            "Which windows: spread = a seeded choice over the whole corpus; first = its start."
        ),
    )
    batch_windows: int = Field(
        8, ge=1, le=256, description="Windows per forward pass generating training activations."
    )
    eval_batch_windows: int = Field(
        2,
        ge=1,
        le=256,
        description=(
            "Windows per forward pass in the evaluation and the browser (memory: the CE-loss "
            "passes hold three [windows, positions, d_vocab] logits at once)."
        ),
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where activations are generated: local, or Ray workers (training: driver).",
    )
    ray_workers: int | None = Field(None, ge=1, description="Ray workers at most.")
    attribution: bool = Field(
        True,
        description=(
            "Attribute the IOI logit difference to the SAE's features at its hook (attribution "
            "patching, the top features patched exactly), linked into the browser."
        ),
    )
    attribution_pairs: int = Field(8, ge=1, le=512, description="IOI prompt pairs attributed.")
    attribution_top: int = Field(
        10, ge=1, le=1000, description="Top features (largest |estimate|) patched exactly."
    )
    planted_check: bool = Field(
        True,
        description=(
            "Also train the same kind of SAE on planted sparse features (64 in 16 dims) and draw "
            "how many it recovers (a few seconds)."
        ),
    )

    @field_validator("corpus")
    @classmethod
    def _sources_exist(cls, sources: list[str]) -> list[str]:
        return checked_corpus_sources(sources)

    @field_validator("k")
    @classmethod
    def _k_within_width(cls, k: int, info: Any) -> int:  # pydantic ValidationInfo
        width = info.data.get("width")
        if width is not None and k > width:
            raise ValueError(f"k={k} is more than width={width}; expected k <= width")
        return k

    @model_validator(mode="after")
    def _consistent(self) -> SaeFeaturesParams:
        if self.buffer_tokens < self.batch_tokens:
            raise ValueError(
                f"buffer_tokens={self.buffer_tokens} is less than batch_tokens="
                f"{self.batch_tokens}; expected at least one batch"
            )
        if self.source is None and self.training_tokens < self.batch_tokens:
            raise ValueError(
                f"training_tokens={self.training_tokens} is less than one batch of "
                f"batch_tokens={self.batch_tokens}"
            )
        return self

    @property
    def eval_windows(self) -> int:
        """Held-out windows: eval_tokens in whole windows, at least one."""
        return max(1, -(-self.eval_tokens // self.context_tokens))

    @property
    def train_windows(self) -> int:
        """Training windows wanted: training_tokens in whole windows (none when loading)."""
        return 0 if self.source is not None else -(-self.training_tokens // self.context_tokens)


def _too_small(found: int, params: SaeFeaturesParams) -> ParamError:
    needed = params.eval_windows + (params.source is None)
    return ParamError(
        "eval_tokens",
        f"the corpus gives {found} window(s) of {params.context_tokens} tokens, too few to hold "
        f"out {params.eval_windows} for evaluation and train on the rest (needs at least "
        f"{needed}); lower eval_tokens or give a larger corpus",
    )


def check_before_loading(
    params: SaeFeaturesParams, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """Check the SAE's source and the corpus before any model loads.

    A release and id must be in SAELens's directory, a folder must hold an SAE; the corpus is
    read as the run will read it and, with the tokenizer, must give the held-out windows and at
    least one to train on.
    """
    from unraveled.corpus import check_corpus, corpus_windows

    if tokenizer is None:
        if isinstance(params.source, PretrainedSource):
            from unraveled.sae.loading import check_release

            check_release(params.source.release, params.source.id)
        elif isinstance(params.source, LocalSource):
            from unraveled.sae.loading import load_local_sae

            load_local_sae(params.source.path)
    if n_ctx is not None and params.context_tokens > n_ctx:
        raise ParamError(
            "context_tokens",
            f"{params.context_tokens} tokens exceed the model's context of {n_ctx}",
        )
    try:
        check_corpus(params.corpus, params.context_tokens, tokenizer)
        if tokenizer is not None:
            needed = params.eval_windows + (params.source is None)
            found = corpus_windows(
                tokenizer,
                params.corpus,
                params.context_tokens,
                needed * params.context_tokens,
                0,
                sample="first",
            )
            if len(found.tokens) < needed:
                raise _too_small(len(found.tokens), params)
    except ConfigError as error:
        raise ParamError(
            (error.field or "params.corpus").removeprefix("params."), error.problem
        ) from None


def hook_of(model: HookedTransformer, params: SaeFeaturesParams, sae: SAE | None) -> str:
    """The hook the run uses: params.hook, else the SAE's own, else the middle block's input."""
    from unraveled.sae.activations import default_hook

    if params.hook is not None:
        return params.hook
    if sae is not None and sae.cfg.metadata.hook_name:
        return str(sae.cfg.metadata.hook_name)
    return default_hook(model)


def load_source(params: SaeFeaturesParams, device: str) -> SAE | None:
    """The SAE ``params.source`` names, loaded (None: the run trains one)."""
    from unraveled.sae.loading import load_local_sae, load_pretrained_sae

    if isinstance(params.source, PretrainedSource):
        return load_pretrained_sae(params.source.release, params.source.id, device)
    if isinstance(params.source, LocalSource):
        return load_local_sae(params.source.path, device)
    return None


def check(model: HookedTransformer, params: SaeFeaturesParams) -> None:
    """The hook exists; a loaded SAE was made for this model's activations at that hook."""
    from unraveled.sae.loading import check_hook, check_sae_fits

    sae = load_source(params, str(model.cfg.device))
    hook = hook_of(model, params, sae)
    if sae is None:
        check_hook(model, hook)
    elif params.hook is None and hook not in model.hook_dict:
        raise ParamError(
            "source",
            f"the SAE was trained on {hook!r}, a hook this model doesn't have: an SAE for "
            "another model",
        )
    else:
        check_sae_fits(sae, model, hook)
    if params.context_tokens + bool(model.cfg.default_prepend_bos) > model.cfg.n_ctx:
        raise ParamError(
            "context_tokens",
            f"{params.context_tokens} tokens (+ BOS) exceed the model's context of "
            f"{model.cfg.n_ctx}",
        )


@dataclass(frozen=True)
class PlantedRecovery:
    """The planted-features check: per planted direction, the nearest decoder direction's cosine."""

    max_cosine: Float[NDArray, " feature"]
    seconds: float

    @property
    def recovered_fraction(self) -> float:
        """Planted directions with a decoder direction at cosine > 0.9."""
        from unraveled.sae.planted import RECOVERED_COSINE

        return float((self.max_cosine > RECOVERED_COSINE).mean())


@dataclass(frozen=True)
class SaeFeaturesResult:
    """The SAE (SAELens's), how it was made, and the windows it was trained and evaluated on."""

    sae: SAE
    hook: str
    source: dict[str, Any]
    corpus: dict[str, Any]
    window_start: Int[NDArray, " window"]
    held_out: NDArray[np.bool_]
    training: dict[str, Any] | None
    planted: PlantedRecovery | None
    evaluation: SAEEvaluation
    attribution: FeatureAttribution | None
    attribution_pairs: int
    browser: FeatureBrowserData
    browser_context_before: int

    def provenance(self) -> str | None:
        """For a trained SAE, what trained it (for titles); None for a loaded one."""
        if self.training is None:
            return None
        return (
            f"a small demo SAE, trained on {self.training['tokens_generated']:,} tokens "
            f"({self.training['passes']} passes, {self.training['steps']} steps)"
        )

    def metrics(self) -> dict[str, Any]:
        """The SAE's shape and provenance, the training's numbers, the planted-features check."""
        from unraveled.sae.spread import window_spreads
        from unraveled.spread import spread

        cfg = self.sae.cfg
        found: dict[str, Any] = {
            "definitions": DEFINITIONS,
            "hook": self.hook,
            "sae": {
                "architecture": cfg.architecture(),
                "d_in": cfg.d_in,
                "d_sae": cfg.d_sae,
                **({"k": cfg.k} if hasattr(cfg, "k") else {}),
                "source": self.source,
            },
            "corpus": self.corpus,
            "evaluation": self.evaluation.metrics()
            | {
                "spread_over_windows": {
                    name: over.as_dict() for name, over in window_spreads(self.evaluation).items()
                }
            },
        }
        if self.training is not None:
            found["training"] = self.training
            found["saved_sae"] = {
                "folder": f"{SAVED_FOLDER}/",
                "format": "SAELens (cfg.json, sae_weights.safetensors)",
                "load": (
                    "from sae_lens import SAE; "
                    f"sae = SAE.load_from_disk('<this run folder>/{SAVED_FOLDER}')"
                ),
                "reuse": f"--set params.source.path=<this run folder>/{SAVED_FOLDER}",
            }
        if self.attribution is not None:
            found["feature_attribution"] = {
                "metric": "IOI logit difference (correct - incorrect name), last token",
                "pairs": self.attribution_pairs,
                "clean_metric": self.attribution.clean_metric,
                "corrupted_metric": self.attribution.corrupted_metric,
                "error_term_estimate": self.attribution.error_estimate,
                "error_term_estimate_spread_over_pairs": spread(
                    self.attribution.error_estimate_per_pair
                ).as_dict(),
                "features_estimate_sum": float(self.attribution.estimate.sum()),
                "top_features": self.attribution.top_features,
                "estimate_exact_correlation": self.attribution.correlation,
            }
        if self.planted is not None:
            found["planted_recovery"] = {
                "features": PLANTED_FEATURES,
                "dims": PLANTED_DIMS,
                "recovered_fraction": self.planted.recovered_fraction,
                "min_max_cosine": float(self.planted.max_cosine.min()),
                "median_max_cosine": float(np.median(self.planted.max_cosine)),
                "seconds": self.planted.seconds,
            }
        found["windows_table"] = (
            "windows.npz: one row per window, its start in the packed corpus and whether it was "
            "held out; pandas.DataFrame(dict(numpy.load('windows.npz')))"
        )
        return found


def _split(n_windows: int, n_held_out: int, seed: int) -> NDArray[np.bool_]:
    """A seeded choice of ``n_held_out`` of ``n_windows`` windows, as a mask."""
    held_out = np.zeros(n_windows, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(n_windows)[:n_held_out]] = True
    return held_out


def train_settings(params: SaeFeaturesParams) -> Any:
    """The training settings ``params`` give (``unraveled.sae.training.TrainSettings``)."""
    from unraveled.sae.training import TrainSettings

    return TrainSettings(
        architecture=params.architecture,
        d_sae=params.width,
        k=params.k,
        l1_coefficient=params.l1_coefficient,
        training_tokens=params.training_tokens,
        batch_tokens=params.batch_tokens,
        buffer_tokens=params.buffer_tokens,
        lr=params.lr,
        passes=params.passes,
    )


def planted_recovery(params: SaeFeaturesParams, seed: int) -> PlantedRecovery:
    """Train the run's kind of SAE on planted features; each planted direction's best cosine."""
    from unraveled.sae.planted import max_cosine_per_planted, planted_features
    from unraveled.sae.training import TrainSettings, train_sae

    started = time.perf_counter()
    planted = planted_features(PLANTED_FEATURES, PLANTED_DIMS, PLANTED_FIRING, seed)
    settings = TrainSettings(
        architecture=params.architecture,
        d_sae=PLANTED_WIDTH,
        k=PLANTED_K,
        l1_coefficient=PLANTED_L1,
        training_tokens=PLANTED_SAMPLES,
        batch_tokens=PLANTED_BATCH,
        buffer_tokens=8 * PLANTED_BATCH,
        lr=PLANTED_LR,
    )
    sae = train_sae(planted.stream(), PLANTED_DIMS, settings, {"hook_name": "planted"}, seed)
    cosine = max_cosine_per_planted(planted.directions, sae).numpy()
    return PlantedRecovery(cosine, time.perf_counter() - started)


def compute(model: HookedTransformer, params: SaeFeaturesParams, seed: int) -> SaeFeaturesResult:
    """Load or train the SAE on the training windows; keep the held-out windows apart."""
    from contextlib import closing

    from unraveled.corpus import corpus_windows
    from unraveled.phases import phase_done
    from unraveled.sae.activations import activation_chunks
    from unraveled.sae.loading import hook_dimension
    from unraveled.sae.training import train_sae

    prepend_bos = bool(model.cfg.default_prepend_bos)
    wanted = params.eval_windows + params.train_windows
    windows = corpus_windows(
        model.tokenizer,
        params.corpus,
        params.context_tokens,
        wanted * params.context_tokens,
        seed,
        origin="sae_features",
        sample=params.sample,
    )
    n_windows = len(windows.tokens)
    if n_windows < params.eval_windows + (params.source is None):
        error = _too_small(n_windows, params)
        raise ConfigError("sae_features", f"params.{error.field}", error.problem)
    held_out = _split(n_windows, params.eval_windows, seed)
    sae = load_source(params, str(model.cfg.device))
    hook = hook_of(model, params, sae)
    training = None
    planted = None
    if sae is None:
        train = windows.tokens[~held_out]
        started = time.perf_counter()
        chunks = activation_chunks(
            model,
            hook,
            train,
            params.batch_windows,
            prepend_bos,
            engine=params.engine,
            workers=params.ray_workers,
            epochs=None,
        )
        generated = [0]  # activations drawn from the forward passes
        with closing(chunks):
            sae = train_sae(
                _counted_tokens(chunks, generated),
                hook_dimension(model, hook),
                train_settings(params),
                {
                    "model_name": model.cfg.model_name,
                    "hook_name": hook,
                    "context_size": params.context_tokens,
                    "prepend_bos": prepend_bos,
                },
                seed,
            )
        seconds = time.perf_counter() - started
        settings = train_settings(params)
        training = {
            "architecture": params.architecture,
            "width": params.width,
            **({"k": params.k} if params.architecture != "standard" else {}),
            **(
                {"l1_coefficient": params.l1_coefficient}
                if params.architecture == "standard"
                else {}
            ),
            "tokens_trained_on": settings.steps * settings.batch_tokens,
            "tokens_generated": generated[0],
            "passes": params.passes,
            "steps": settings.steps,
            "batch_tokens": params.batch_tokens,
            "buffer_tokens": params.buffer_tokens,
            "lr": params.lr,
            "engine": params.engine,
            "training_windows": len(train),
            "passes_over_training_windows": generated[0] / train.size,
            "seconds": seconds,
            "generated_tokens_per_second": generated[0] / seconds,
        }
        if params.planted_check:
            planted = planted_recovery(params, seed)
        # Training's buffers and forward passes leave ~280 MiB of freed heap (measured on the
        # bundled SmolLM2) that the evaluation's vocabulary-sized logits would sit on top of: a
        # run hands it back here (a notebook's process is left alone).
        phase_done()
    held = windows.tokens[held_out]
    evaluated, browser, browser_settings = _evaluate(model, sae, hook, held, params, prepend_bos)
    phase_done()  # the evaluation's logits, before the attribution's own
    attribution = _attribute(model, sae, hook, params, seed) if params.attribution else None
    source: dict[str, Any] = (
        {"trained": "in this run"}
        if params.source is None
        else params.source.model_dump() | {"model_name": sae.cfg.metadata.model_name}
    )
    return SaeFeaturesResult(
        sae=sae,
        hook=hook,
        source=source,
        corpus={
            "sources": windows.sources,
            "documents": windows.n_documents,
            "corpus_tokens": windows.corpus_tokens,
            "windows": n_windows,
            "held_out_windows": int(held_out.sum()),
            "held_out_tokens": int(held_out.sum()) * params.context_tokens,
            "context_tokens": params.context_tokens,
            "sample": params.sample,
            "seed": seed,
            "prepend_bos": prepend_bos,
            "held_out_window_starts_first_10": windows.start[held_out][:10],
        },
        window_start=windows.start,
        held_out=held_out,
        training=training,
        planted=planted,
        evaluation=evaluated,
        attribution=attribution,
        attribution_pairs=params.attribution_pairs,
        browser=browser,
        browser_context_before=browser_settings.context_before,
    )


def _evaluate(
    model: HookedTransformer,
    sae: SAE,
    hook: str,
    held: Int[NDArray, "window pos"],
    params: SaeFeaturesParams,
    prepend_bos: bool,
) -> tuple[SAEEvaluation, FeatureBrowserData, Any]:
    """The SAE's evaluation and its feature browser's data, both on the held-out windows."""
    import torch

    from unraveled.sae.browser import BrowserSettings, feature_browser_data
    from unraveled.sae.evaluation import evaluate_sae

    # BOS in front as in training; both count the positions unraveled.sae.positions counts.
    tokens = torch.from_numpy(held.astype(np.int64))
    evaluated = evaluate_sae(
        model, sae, hook, tokens, params.eval_batch_windows, prepend_bos=prepend_bos
    )
    settings = BrowserSettings(batch_windows=params.eval_batch_windows, prepend_bos=prepend_bos)
    return evaluated, feature_browser_data(model, sae, hook, held, settings), settings


def _counted_tokens(
    chunks: Iterator[Any], generated: list[int]
) -> Iterator[Float[Any, "token d_in"]]:
    """``chunks`` passed through, their rows added up in ``generated[0]``."""
    for chunk in chunks:
        generated[0] += len(chunk)
        yield chunk


def _attribute(
    model: HookedTransformer, sae: SAE, hook: str, params: SaeFeaturesParams, seed: int
) -> FeatureAttribution:
    """The IOI logit difference attributed to the SAE's features at its hook."""
    from unraveled.datasets.ioi import IOIParams, ioi_batch
    from unraveled.sae.attribution import feature_attribution

    pairs = ioi_batch(model, IOIParams(n_pairs=params.attribution_pairs), seed).tokens
    return feature_attribution(
        model, sae, hook, pairs, top=params.attribution_top, max_rows=ATTRIBUTION_ROWS
    )


def render(result: SaeFeaturesResult) -> Iterator[Artifact]:
    """Figures (planted features, evaluation), feature browser, tables, the trained SAE saved."""
    from unraveled.render.feature_browser import feature_browser_page
    from unraveled.sae.figures import evaluation_figures
    from unraveled.sae.figures_attribution import attribution_figure, attribution_table

    provenance = result.provenance()
    if result.planted is not None:
        yield planted_figure(result.planted, result.sae.cfg.architecture())
    yield from evaluation_figures(result.evaluation, first_number=2, provenance=provenance)
    if result.attribution is not None:
        yield attribution_figure(result.attribution, name="05_sae_feature_attribution")
        yield attribution_table(result.attribution, browser_page=BROWSER_PAGE)
    title = f"SAE features at {result.hook}" + (f": {provenance}" if provenance else "")
    yield feature_browser_page(
        result.browser,
        result.browser_context_before,
        name=BROWSER_PAGE,
        title=title,
        facts={"windows": f"the {int(result.held_out.sum())} held-out windows"},
    )
    yield from result.evaluation.tables()
    yield Table(
        "windows",
        {"start": result.window_start, "held_out": result.held_out},
        "one row per window of the run: its first token's position in the packed corpus, and "
        "whether it was held out of training",
    )
    if result.training is not None:
        yield Saved(
            SAVED_FOLDER,
            result.sae.save_model,
            "the trained SAE in SAELens's format: sae_lens.SAE.load_from_disk(folder)",
        )


def planted_figure(planted: PlantedRecovery, architecture: str) -> Figure:
    """Planted against recovered: each planted direction's best cosine with a decoder direction."""
    from matplotlib.figure import Figure as MplFigure

    from unraveled.sae.planted import RECOVERED_COSINE

    order = np.argsort(-planted.max_cosine)
    # Constrained layout, as every other figure: the runner adds the model line above the title
    # (without it the two overlapped). Wider than a panel, for 64 bars and the two-line title.
    figure = MplFigure(figsize=(9, 4.5), layout="constrained")
    axes = figure.add_subplot()
    recovered = planted.max_cosine[order] > RECOVERED_COSINE
    axes.bar(
        np.arange(len(order)),
        planted.max_cosine[order],
        color=np.where(recovered, "tab:green", "tab:gray"),
        width=0.8,
    )
    axes.axhline(RECOVERED_COSINE, color="black", linestyle="--", linewidth=1)
    axes.text(len(order) - 0.5, RECOVERED_COSINE + 0.01, "recovered", ha="right", va="bottom")
    axes.set(
        ylim=(0, 1.05),
        xlabel="Planted feature (sorted)",
        ylabel="Largest cosine with a decoder direction",
        title=(
            f"{PLANTED_FEATURES} sparse features planted in {PLANTED_DIMS} dimensions: "
            f"{int(recovered.sum())} of {len(order)} ({planted.recovered_fraction:.0%}) "
            f"recovered\nby a {architecture} SAE of {PLANTED_WIDTH} features (this seed's "
            "planted directions and training)"
        ),
    )
    # Measured for TopK only: another architecture's count over seeds is not known.
    measured = (
        ": 60 to 64 of 64 (94% to 100%) at seeds 0 to 7 for TopK (docs/sae.md)"
        if architecture == "topk"
        else ""
    )
    return Figure(
        "01_planted_features",
        figure,
        "The known answer: per planted feature (superposition, 64 in 16 dims), the cosine of the "
        f"SAE's nearest decoder direction; recovered above 0.9. The count moves with the seed"
        f"{measured}",
    )


EXPERIMENT = Experiment(
    title="SAE features: a sparse autoencoder on one hook (SAELens)",
    params=SaeFeaturesParams,
    compute=compute,
    render=render,
    check=check,
    check_before_loading=check_before_loading,
    # The feature attribution keeps activations and gradients by their hook's name, as attribution
    # patching does; a TransformerBridge's aliases would miss them.
    needs=frozenset({"hook_names"}),
)
