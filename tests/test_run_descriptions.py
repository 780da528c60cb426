"""What a run says about itself: descriptions quote the params that ran, overrides are marked, and
no description claims what the model that ran doesn't have.

Through the CLI on the tiny models, then the manifest and the pages are read back.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from unraveled.cli import main
from unraveled.config import config_names, load_config, render_description
from unraveled.errors import ConfigError

FRANCE = "The capital of France is"


def _text(html: str) -> str:
    """A page's visible text, tags dropped, whitespace collapsed."""

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []

        def handle_data(self, data: str) -> None:
            self.parts.append(data)

    parser = Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split())


def test_a_set_prompt_is_the_one_the_manifest_and_pages_quote(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "logit_lens",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
                "--set",
                f"params.prompt={FRANCE}",
            ]
        )
        == 0
    )
    run_dir = out / "tiny-gpt2" / "logit_lens"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    shipped = yaml.safe_load(Path("configs/logit_lens.yaml").read_text())
    assert shipped["params"]["prompt"] not in manifest["description"]
    assert manifest["description"].startswith(f'The logit lens on "{FRANCE}": ')
    assert manifest["overrides"] == {"params.prompt": FRANCE}
    # The figure drew the same prompt: the tokens of the run are the new prompt's.
    assert "".join(json.loads((run_dir / "metrics.json").read_text())["tokens"]).endswith(FRANCE)
    page = _text((run_dir / "index.html").read_text())
    assert f'The logit lens on "{FRANCE}"' in page and "When Mary" not in page
    assert "overridden: params.prompt from --set" in page
    assert f"params.prompt {FRANCE} --set" in page  # the params table: the value as it ran, marked
    index = _text((out / "index.html").read_text())
    assert (
        "overridden: params.prompt from --set" in index and f'The logit lens on "{FRANCE}"' in index
    )


def test_a_run_without_set_is_not_marked(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    assert main(["run", "logit_lens", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    manifest = json.loads((out / "tiny-gpt2" / "logit_lens" / "manifest.json").read_text())
    assert manifest["overrides"] == {}
    page = _text((out / "tiny-gpt2" / "logit_lens" / "index.html").read_text())
    assert "overridden:" not in page and "Overridden." not in page and "--set" not in page


def test_descriptions_on_a_model_without_position_embeddings(
    tiny_llama_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    args = [
        "--set",
        "params.chunk_tokens=20",
        "--set",
        "params.local_subsets=2",
        "--set",
        "params.local_neighbours=30",
        "--set",
        "params.projected_tokens=20",
    ]
    assert (
        main(["run", "embeddings", "--model", str(tiny_llama_dir), "--out", str(out), *args]) == 0
    )
    run_dir = out / "tiny-llama" / "embeddings"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert (
        manifest["resolved_config"]["model"] == "gpt2"
        and manifest["model"]["architecture"] == "LlamaForCausalLM"
    )
    description = manifest["description"]
    # Nothing of GPT-2's is claimed of this model: positions only for a model that learns them.
    assert "GPT-2's" not in description
    assert re.search(r"for a model that learns them[^:]*, its position embeddings", description)
    page = _text((run_dir / "index.html").read_text())
    assert (
        "Not applicable: position embeddings" in page
        and "figures/04_position_embedding_chunk" not in page
    )


@pytest.mark.parametrize("name", config_names())
def test_shipped_descriptions_claim_nothing_of_one_model(name: str) -> None:
    description = load_config(name).description
    # Possessives of a model name ("GPT-2's token and position embedding matrices") describe that
    # model only.
    assert not re.search(r"\b(GPT-2|SmolLM2|gpt2)'s\b", description), description
    # A description that mentions position embeddings says they may be absent.
    if "position embeddings" in description:
        assert (
            "for a model that learns them" in description
            or "without learned positions" in description
        )


def test_placeholders_quote_nested_params_and_seed() -> None:
    resolved = {
        "seed": 4,
        "params": {
            "prompt": "Hi",
            "ioi": {"n_pairs": 6},
            "flag": False,
            "names": ["a", "b"],
            "cap": None,
        },
    }
    text = render_description(
        "{params.prompt}|{params.ioi.n_pairs}|{seed}|{params.flag}|{params.names}|{params.cap}|"
        "{not one}",
        resolved,
        "x",
    )
    assert text == "Hi|6|4|false|a, b|none|{not one}"


def test_right_to_left_text_is_isolated_in_a_description() -> None:
    override = "\u202ereversed"
    text = render_description(
        'on "{params.prompt}": more', {"seed": 0, "params": {"prompt": override}}, "x"
    )
    assert text == 'on "\u2068\u202ereversed\u2069": more'


@pytest.mark.parametrize(
    ("placeholder", "fragment"),
    [
        ("{params.promt}", "names no param; did you mean 'prompt'?"),
        ("{model}", "is not a placeholder"),
    ],
)
def test_cli_refuses_a_placeholder_naming_no_param(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], placeholder: str, fragment: str
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "lens.yaml"
    path.write_text(f"experiment: logit_lens\ndescription: The lens on {placeholder}.\n")
    out = tmp_path / "out"
    assert main(["run", "lens", "--config-dir", str(folder), "--out", str(out)]) == 2
    assert f"{path}: description: {placeholder} {fragment}" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"--set for logit_lens: description \(from --set\)"):
        load_config("logit_lens", overrides=[f"description=on {placeholder}"])
