"""Load an SAE (SAELens's pretrained releases, or a folder in SAELens's format); check it fits.

Release and id are checked against SAELens's own directory of pretrained SAEs, which ships with
the package, so a name that doesn't exist is refused before anything is downloaded.
``load_sae`` then uses SAELens's hub code (``SAE.from_pretrained``) or ``SAE.load_from_disk``;
``check_sae_fits`` checks the SAE against the model and hook it is to run on.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from unraveled.errors import ModelUnavailableError, ParamError
from unraveled.sae.activations import run_to_hook

SAE_FILES = ("cfg.json", "sae_weights.safetensors")


def _suggestion(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_release(release: str, sae_id: str) -> None:
    """Refuse a release or id that SAELens's directory of pretrained SAEs doesn't list.

    Raises:
        ParamError: Naming ``source.release`` or ``source.id`` and close matches.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ParamError(
            "source.release",
            f"{release!r} is not one of SAELens's pretrained SAE releases"
            f"{_suggestion(release, list(directory))}; see "
            "https://decoderesearch.github.io/SAELens/latest/pretrained_saes/",
        )
    ids = list(directory[release].saes_map)
    if sae_id not in ids:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise ParamError(
            "source.id",
            f"{sae_id!r} is not an SAE of release {release!r}"
            f"{_suggestion(sae_id, ids)}; it has {len(ids)}: {shown}",
        )


def load_local_sae(path: str, device: str = "cpu") -> SAE[Any]:
    """The SAE saved in SAELens's format in folder ``path`` (``SAE.load_from_disk``).

    Raises:
        ParamError: Naming ``source.path``: no such folder, or not an SAE SAELens can load.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ParamError("source.path", f"{path}: no such folder; expected an SAE's folder")
    missing = [name for name in SAE_FILES if not (folder / name).is_file()]
    if missing:
        raise ParamError(
            "source.path",
            f"{path}: not an SAE in SAELens's format (no {', '.join(missing)}; expected the "
            "folder SAE.save_model writes)",
        )
    try:
        return SAE.load_from_disk(str(folder), device=device)
    except Exception as error:  # anything SAELens can't read is bad input
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ParamError(
            "source.path",
            f"{path}: SAELens can't load it as an SAE ({type(error).__name__}: {first})",
        ) from None


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu") -> SAE[Any]:
    """SAELens's pretrained SAE ``release``/``sae_id`` (``SAE.from_pretrained``: the hub's code).

    Raises:
        ParamError: The release or id is not in SAELens's directory.
        ModelUnavailableError: The hub can't be reached (or ``HF_HUB_OFFLINE`` is set) and the
            SAE is not in the local Hugging Face cache.
    """
    check_release(release, sae_id)
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from requests.exceptions import RequestException

    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except (LocalEntryNotFoundError, HfHubHTTPError, RequestException, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelUnavailableError(
            f"params.source: can't download SAE {release}/{sae_id} from the Hugging Face hub "
            f"and it is not in the local cache ({type(error).__name__}: {first}). Connect to "
            "the hub (unset HF_HUB_OFFLINE), or save the SAE with SAE.save_model and give its "
            "folder as params.source.path"
        ) from None


def hook_dimension(model: HookedTransformer, hook_name: str) -> int:
    """The size of the last dimension of ``hook_name``'s activations (one token, one pass)."""
    tokens = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
    return run_to_hook(model, hook_name, tokens).shape[-1]


def check_hook(model: HookedTransformer, hook_name: str) -> None:
    """Refuse a hook the model doesn't have.

    Raises:
        ParamError: Naming ``hook`` and a few hooks the model has.
    """
    if hook_name not in model.hook_dict:
        raise ParamError(
            "hook",
            f"{hook_name!r} is not a hook of this model"
            f"{_suggestion(hook_name, list(model.hook_dict))}; e.g. blocks.0.hook_resid_pre .. "
            f"blocks.{model.cfg.n_layers - 1}.hook_resid_post",
        )


def check_sae_fits(sae: SAE[Any], model: HookedTransformer, hook_name: str) -> None:
    """Refuse an SAE made for another hook or another model's activations.

    The SAE's hook (SAELens metadata ``hook_name``, where it says) must be ``hook_name`` and its
    ``d_in`` the size of the model's activations there.

    Raises:
        ParamError: Naming ``hook`` (another hook) or ``source`` (another size).
    """
    check_hook(model, hook_name)
    trained_on = sae.cfg.metadata.hook_name
    if trained_on is not None and trained_on != hook_name:
        raise ParamError(
            "hook",
            f"{hook_name!r}, but the SAE was trained on {trained_on!r}; leave params.hook unset "
            "to use the SAE's own hook",
        )
    size = hook_dimension(model, hook_name)
    if sae.cfg.d_in != size:
        model_name = sae.cfg.metadata.model_name
        raise ParamError(
            "source",
            f"the SAE takes d_in={sae.cfg.d_in} activations"
            f"{f' (trained on {model_name})' if model_name else ''}, but this model's "
            f"{hook_name} has {size}: an SAE for another model",
        )
