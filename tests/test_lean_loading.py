"""The memory-lean conversion and cache read give exactly what TransformerLens's own path gives.

``hooked_from_hf`` skips the whole-state-dict copies TransformerLens's weight processing makes at
each step, and ``weight_cache`` copies stored tensors into the model one at a time. The reference
here is TransformerLens's stock ``load_and_process_state_dict`` (copies included) on the same
converted state dict, and the tensors as written to the cache file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from unraveled.models import load_model
from unraveled.models.convert import _hf_config_dict, hooked_from_hf, processing_flags
from unraveled.models.loading import arrange_weights


def _stock_transformer_lens(folder: Path, weights: str) -> HookedTransformer:
    """The conversion as TransformerLens does it, its defensive copies included."""
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    flags = processing_flags(weights)
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp) / "checkpoint"
        config_dir.mkdir()
        (config_dir / "config.json").write_text(json.dumps(_hf_config_dict(hf_model)))
        cfg = tl_loading.get_pretrained_model_config(
            str(config_dir), fold_ln=flags["fold_ln"], dtype=torch.float32
        )
        state_dict = tl_loading.get_pretrained_state_dict(str(config_dir), cfg, hf_model)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, refactor_factored_attn_matrices=False, **flags)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_tied_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama with its unembedding tied to its embedding, as SmolLM2's is."""
    from tests.helpers.models import save_checkpoint

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    return save_checkpoint(
        LlamaForCausalLM(config),
        AutoTokenizer.from_pretrained(tiny_llama_dir),
        tmp_path_factory.mktemp("tied") / "tiny-tied",
        norm_seed=3,
    )


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir", "tiny_tied_llama_dir"])
@pytest.mark.parametrize("weights", ["processed", "raw"])
def test_lean_conversion_equals_transformer_lens_stock_processing(
    checkpoint: str, weights: str, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue(checkpoint)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf_before = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    lean, n_parameters = hooked_from_hf(
        lambda: hf_model, AutoTokenizer.from_pretrained(folder), weights, model_name="lean"
    )
    stock = _stock_transformer_lens(folder, weights)
    assert n_parameters == sum(
        parameter.numel() for parameter in AutoModelForCausalLM.from_pretrained(folder).parameters()
    )

    lean_state, stock_state = lean.state_dict(), stock.state_dict()
    assert lean_state.keys() == stock_state.keys()
    for name, tensor in stock_state.items():
        assert type(lean_state[name]) is torch.Tensor, (
            name
        )  # no tensor subclass leaks into the model
        assert torch.equal(lean_state[name], tensor), name
    assert lean.cfg.normalization_type == stock.cfg.normalization_type
    assert [type(module) for module in lean.modules()] == [
        type(module) for module in stock.modules()
    ]
    # Each parameter has storage of its own, as the parameters TransformerLens allocates do
    # (GPT-2's query, key and value come out of one fused checkpoint matrix), but for raw weights
    # of a checkpoint that ties its unembedding to its embedding: one storage, as in the checkpoint.
    storages = [parameter.untyped_storage() for parameter in lean.parameters()]
    assert all(
        storage.nbytes() == parameter.numel() * 4
        for storage, parameter in zip(storages, lean.parameters(), strict=True)
    )
    tied = (
        weights == "raw"
        and hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
    )
    assert len({storage.data_ptr() for storage in storages}) == len(storages) - tied
    assert (
        lean.unembed.W_U.untyped_storage().data_ptr() == lean.embed.W_E.untyped_storage().data_ptr()
    ) == tied
    tokens = stock.to_tokens("The quick brown fox jumps over the lazy dog")
    _, lean_cache = lean.run_with_cache(tokens)
    _, stock_cache = stock.run_with_cache(tokens)
    assert lean_cache.keys() == stock_cache.keys()
    for name in stock_cache:
        assert torch.equal(lean_cache[name], stock_cache[name]), name
    # The processing is functional: the transformers model it read from is left as it was.
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(tensor, hf_before[name]), name


@pytest.mark.parametrize(
    ("checkpoint", "weights"), [("tiny_llama_dir", "processed"), ("tiny_gpt2_dir", "raw")]
)
def test_cache_read_restores_every_tensor_in_its_layout_each_storage_stored_once(
    checkpoint: str, weights: str, request: pytest.FixtureRequest, weight_cache: Path
) -> None:
    """A cached load is the converted model again, weights laid out as the forward pass reads them
    and the raw unembedding tied as before, so nothing is copied after the read; the file holds
    each storage once (GPT-2's tied embedding once, not again as the unembedding)."""
    folder = request.getfixturevalue(checkpoint)
    first = load_model(str(folder), weights).model
    second = load_model(str(folder), weights)
    assert second.from_weight_cache
    loaded = second.model.state_dict()
    assert loaded.keys() == first.state_dict().keys()
    for name, tensor in first.state_dict().items():
        assert torch.equal(loaded[name], tensor) and loaded[name].stride() == tensor.stride(), name
    storages = {
        tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
        for tensor in first.state_dict().values()
    }
    (stored_file,) = weight_cache.glob(f"weights/*-{weights}-*/model.safetensors")
    stored = safetensors.torch.load_file(stored_file)
    assert sum(tensor.numel() * tensor.element_size() for tensor in stored.values()) == sum(
        storages.values()
    )
    model = second.model
    tied = (
        model.unembed.W_U.untyped_storage().data_ptr()
        == model.embed.W_E.untyped_storage().data_ptr()
    )
    assert tied == (weights == "raw" and checkpoint == "tiny_gpt2_dir")
    before = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    arrange_weights(model)
    assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == before


def test_processed_unembedding_is_the_tensor_processing_made(
    tiny_gpt2_dir: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processing leaves the folded, centred unembedding transposed in memory, the layout the
    forward pass reads: the model keeps that very tensor, without a copy (each was 0.15 GB for
    GPT-2 small), and the cache stores it as laid out."""
    from transformer_lens.weight_processing import ProcessWeights

    made: list[int] = []
    center_unembed = ProcessWeights.center_unembed

    def recording(
        state_dict: dict[str, torch.Tensor], *args: object, **kwargs: object
    ) -> dict[str, torch.Tensor]:
        centred = center_unembed(state_dict, *args, **kwargs)
        made.append(centred["unembed.W_U"].untyped_storage().data_ptr())
        return centred

    monkeypatch.setattr(ProcessWeights, "center_unembed", staticmethod(recording))
    model = load_model(str(tiny_gpt2_dir), "processed").model
    assert made == [model.unembed.W_U.untyped_storage().data_ptr()]
    assert model.unembed.W_U.T.is_contiguous()


@pytest.mark.parametrize(
    "damage", ["a stored tensor dropped", "the weights file truncated", "the config not JSON"]
)
def test_damaged_cache_entry_is_converted_again_saying_so(
    damage: str, tiny_gpt2_dir: Path, weight_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_model(str(tiny_gpt2_dir), "raw").model
    (entry,) = weight_cache.glob("weights/tiny-gpt2-raw-*")
    weights_file = entry / "model.safetensors"
    if damage == "a stored tensor dropped":
        stored = safetensors.torch.load_file(weights_file)
        del stored[next(name for name in stored if name.endswith("attn.W_Q"))]
        safetensors.torch.save_file(stored, weights_file)
    elif damage == "the weights file truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    else:
        (entry / "hooked_config.json").write_text("{not json")
    with caplog.at_level("WARNING"):
        again = load_model(str(tiny_gpt2_dir), "raw")
    assert (
        not again.from_weight_cache
        and str(entry) in caplog.text
        and "converting again" in caplog.text
    )
    for name, tensor in first.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    assert load_model(str(tiny_gpt2_dir), "raw").from_weight_cache  # the entry is whole again


def test_model_is_moved_to_the_device_asked_for_whether_converted_or_cached(
    tiny_gpt2_dir: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: ``HookedTransformer.to`` records where it was asked to go (stays on the CPU)."""
    moved_to: list[str] = []
    to = HookedTransformer.to

    def recording_to(
        self: HookedTransformer, device: str, *args: object, **kwargs: object
    ) -> HookedTransformer:
        moved_to.append(device)
        return to(self, "cpu", *args, **kwargs)

    monkeypatch.setattr(HookedTransformer, "to", recording_to)
    assert not load_model(str(tiny_gpt2_dir), "processed", device="cuda:1").from_weight_cache
    assert load_model(str(tiny_gpt2_dir), "processed", device="cuda:1").from_weight_cache
    assert moved_to == ["cuda:1", "cuda:1"]


def test_lean_conversion_refuses_processing_that_edits_a_clone_in_place(
    tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean conversion's clones are the tensors themselves: an in-place edit of one (as
    TransformerLens does to value biases in one branch) would change the checkpoint's tensor."""
    from transformer_lens.weight_processing import ProcessWeights

    def edits_in_place(
        state_dict: dict[str, torch.Tensor], *args: object, **kwargs: object
    ) -> dict[str, torch.Tensor]:
        b_V = state_dict["blocks.0.attn.b_V"].clone()
        b_V[0] = 0
        return state_dict

    monkeypatch.setattr(ProcessWeights, "fold_value_biases", staticmethod(edits_in_place))
    with pytest.raises(RuntimeError, match="in place"):
        hooked_from_hf(
            lambda: AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir),
            AutoTokenizer.from_pretrained(tiny_gpt2_dir),
            "processed",
            model_name="lean",
        )


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_rearranged_weights_give_bit_identical_forward_passes_and_gradients(
    checkpoint: str, request: pytest.FixtureRequest, weight_cache: Path
) -> None:
    from transformer_lens.components import GatedMLP

    from unraveled.models.layout import store_rearranged

    folder = request.getfixturevalue(checkpoint)
    loaded = load_model(str(folder), "processed").model
    plain = _stock_transformer_lens(folder, "processed")
    assert all(parameter.is_contiguous() for parameter in plain.parameters())
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # What TransformerLens rearranges in its forward pass is already laid out that way: a view.
    attention = loaded.blocks[0].attn
    assert attention.W_Q.permute(0, 2, 1).is_contiguous() and not attention.W_Q.is_contiguous()
    assert attention.W_O.permute(2, 0, 1).is_contiguous()
    assert loaded.unembed.W_U.T.is_contiguous()
    if isinstance(loaded.blocks[0].mlp, GatedMLP):
        assert (
            loaded.blocks[0].mlp.W_in.T.is_contiguous()
            and loaded.blocks[0].mlp.W_gate.T.is_contiguous()
        )
    assert store_rearranged(loaded) is loaded  # a second pass changes nothing

    tokens = loaded.to_tokens(["The quick brown fox jumps over the lazy dog"])
    assert torch.equal(loaded(tokens), plain(tokens))

    def gradient(model: HookedTransformer) -> torch.Tensor:
        embedded: list[torch.Tensor] = []

        def keep(activation: torch.Tensor, hook: object) -> torch.Tensor:
            tracked = activation.detach().requires_grad_(True)
            embedded.append(tracked)
            return tracked

        with torch.enable_grad():
            model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", keep)])[0, -1, 0].backward()
        return embedded[0].grad

    embed_grad = gradient(plain)
    assert embed_grad is not None and embed_grad.abs().sum() > 0
    assert torch.equal(gradient(loaded), embed_grad)


@pytest.mark.parametrize("weights", ["processed", "raw"])
def test_hugging_face_cache_model_converts_as_transformer_lens_from_pretrained_does(
    weights: str, hf_home_with_gpt2: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gpt2`` from the Hugging Face cache: the lean conversion against TransformerLens's own
    ``from_pretrained`` of the same cached snapshot (here, the tiny checkpoint laid out as
    ``gpt2``)."""
    from unraveled.models import hub

    hub_cache = hf_home_with_gpt2 / "hub"
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(hub_cache))
    loaded = load_model("gpt2", weights)
    assert loaded.loaded_from.startswith("Hugging Face cache") and not loaded.from_weight_cache
    snapshot = hub.cached_snapshot("gpt2")
    with pytest.warns(DeprecationWarning):
        stock = HookedTransformer.from_pretrained(
            "gpt2",
            tokenizer=AutoTokenizer.from_pretrained(snapshot),
            cache_dir=str(hub_cache),
            local_files_only=True,
            **processing_flags(weights),
        ).eval()

    lean_cfg, stock_cfg = loaded.model.cfg.to_dict(), stock.cfg.to_dict()
    different = {field for field in stock_cfg if lean_cfg.get(field) != stock_cfg[field]}
    assert different <= {"tokenizer_name"}, {
        field: (lean_cfg.get(field), stock_cfg[field]) for field in different
    }
    lean_state, stock_state = loaded.model.state_dict(), stock.state_dict()
    assert lean_state.keys() == stock_state.keys()
    for name, tensor in stock_state.items():
        assert torch.equal(lean_state[name], tensor), name
    tokens = stock.to_tokens("The quick brown fox jumps over the lazy dog")
    assert torch.equal(loaded.model(tokens), stock(tokens))


def test_conversion_frees_each_checkpoint_tensor_once_processing_has_replaced_it(
    tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By the last processing step, the checkpoint's tensors are gone (processing has replaced
    them all): nothing (a caller's reference, an autograd graph) keeps them beside the model."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from transformer_lens.weight_processing import ProcessWeights

    folded_into: list[
        tuple[StorageWeakRef, int]
    ] = []  # the blocks' weights that LayerNorm folds into
    everything: list[tuple[StorageWeakRef, int]] = []

    def load_hf() -> torch.nn.Module:
        hf_model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32)
        for name, parameter in hf_model.named_parameters():
            reference = (
                StorageWeakRef(parameter.untyped_storage()),
                parameter.untyped_storage().nbytes(),
            )
            everything.append(reference)
            if any(part in name for part in (".ln_1.", ".ln_2.", ".attn.c_attn.", ".mlp.c_fc.")):
                folded_into.append(reference)
        return hf_model

    def alive(references: list[tuple[StorageWeakRef, int]]) -> int:
        return sum(nbytes for storage, nbytes in references if not storage.expired())

    alive_after_folding_the_blocks: list[int] = []
    alive_at_the_last_step: list[int] = []

    def spy(function, seen: list[int], references: list[tuple[StorageWeakRef, int]]):  # type: ignore[no-untyped-def]
        def measured(*args: object, **kwargs: object) -> object:
            seen.append(alive(references))
            return function(*args, **kwargs)

        return staticmethod(measured)

    # Folding the final norm into the unembedding comes after every block is folded, inside the
    # same step: the blocks' checkpoint tensors it replaced must be gone already, not at the end
    # of the step.
    monkeypatch.setattr(
        ProcessWeights,
        "_fold_unembed_layer_norm",
        spy(ProcessWeights._fold_unembed_layer_norm, alive_after_folding_the_blocks, folded_into),
    )
    monkeypatch.setattr(
        ProcessWeights,
        "center_unembed",
        spy(ProcessWeights.center_unembed, alive_at_the_last_step, everything),
    )
    hooked_from_hf(
        load_hf, AutoTokenizer.from_pretrained(tiny_gpt2_dir), "processed", model_name="lean"
    )
    assert alive_after_folding_the_blocks == [0] and alive_at_the_last_step == [0]


def test_model_downloaded_from_the_hub_is_converted_from_its_snapshot(
    tiny_gpt2_dir: Path, tmp_path: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the hub answers, the checkpoint's files are downloaded into the Hugging Face cache
    (safetensors weights, not the same weights again as ``.bin``) and converted from there. The
    hub itself can't be reached here: ``snapshot_download`` is replaced by a copy of the tiny
    checkpoint into an empty cache."""
    import shutil

    from unraveled.models import hub

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    asked: list[list[str]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append(allow_patterns)
        snapshot = hub_cache / f"models--{repo_id}" / "snapshots" / ("f" * 40)
        shutil.copytree(tiny_gpt2_dir, snapshot, dirs_exist_ok=True)
        (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text("f" * 40)
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    loaded = load_model("gpt2", "processed")
    assert loaded.loaded_from == "Hugging Face hub (gpt2)" and loaded.revision == "f" * 40
    assert len(asked) == 1 and not any(pattern.endswith(".bin") for pattern in asked[0])
    from_folder = load_model(str(tiny_gpt2_dir), "processed").model
    for name, tensor in from_folder.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("checkpoint", "weights", "shared"),
    [
        ("tiny_gpt2_dir", "raw", True),
        ("tiny_gpt2_dir", "processed", False),
        ("tiny_llama_dir", "raw", False),
    ],
)
def test_unembedding_shares_the_embedding_storage_where_the_checkpoint_ties_them(
    checkpoint: str, weights: str, shared: bool, request: pytest.FixtureRequest, weight_cache: Path
) -> None:
    """GPT-2 ties its unembedding to its embedding; raw weights keep that tie (one storage), and
    the model computes what it computed with a copy of its own."""
    folder = request.getfixturevalue(checkpoint)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for source in ("converted", "converted-weights cache"):
        loaded = load_model(str(folder), weights)
        assert loaded.from_weight_cache == (source == "converted-weights cache")
        model = loaded.model
        assert (
            model.unembed.W_U.untyped_storage().data_ptr()
            == model.embed.W_E.untyped_storage().data_ptr()
        ) == shared
        if weights == "raw":
            assert torch.equal(model.unembed.W_U, hf_model.get_output_embeddings().weight.T)
    untied = _stock_transformer_lens(folder, weights)
    assert (
        untied.unembed.W_U.untyped_storage().data_ptr()
        != untied.embed.W_E.untyped_storage().data_ptr()
    )
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog")
    assert torch.equal(model(tokens), untied(tokens))
