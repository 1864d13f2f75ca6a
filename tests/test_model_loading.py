"""Loading models: the bundled one converted once into the cache folder (the same logits as its GGUF file),
models named by what they are, and ``--model default`` wherever ``--model`` is taken.

The suite's cache folder is a temporary one (conftest.py); tests that need another set their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import requires_real_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import polykv
from polykv.cli import main
from polykv.model import DEFAULT_MODEL_NAME, converted, default_model_location, locate, model_name
from polykv.testing import prompt, tiny_model
from polykv.testing.models import SHAPE


def test_the_cache_folder_follows_its_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYKV_CACHE_DIR", str(tmp_path / "kept"))
    assert converted.cache_folder() == tmp_path / "kept"
    for off in ("none", " NONE "):
        monkeypatch.setenv("POLYKV_CACHE_DIR", off)
        assert converted.cache_folder() is None
    monkeypatch.delenv("POLYKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert converted.cache_folder() == tmp_path / "xdg" / "polykv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert converted.cache_folder() == tmp_path / "home" / ".cache" / "polykv"


def test_the_suite_keeps_converted_models_in_a_temporary_folder():
    assert Path(os.environ["POLYKV_CACHE_DIR"]).name.startswith("polykv-test-cache-")


def test_models_are_named_by_what_they_are_never_by_a_path(tmp_path):
    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abc"
    assert model_name(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    mine = tmp_path / "my-llama"
    mine.mkdir()
    assert model_name(str(mine)) == "my-llama"
    assert model_name("") == ""
    (mine / "config.json").write_text("{}")
    assert locate(mine).name == "my-llama"
    (tmp_path / "Other-7B.Q4_K_M.gguf").write_bytes(b"GGUF")
    assert locate(tmp_path / "Other-7B.Q4_K_M.gguf").name == "Other-7B.Q4_K_M"


def test_a_model_without_a_name_is_named_by_its_class():
    info, _ = polykv.model.describe_model(tiny_model("llama"))
    assert info.name == "LlamaForCausalLM"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SHAPE["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_written_folder_loads_the_same_model_and_tokenizer(tmp_path):
    """What a conversion writes: a transformers folder with the same logits (tied weights stored once)."""
    model = tiny_model("llama", tie_word_embeddings=True)
    tokenizer = tiny_tokenizer()
    key = {"format": converted.FORMAT, "sha256": "0" * 64}
    converted.write(tmp_path, model, tokenizer, key)

    assert json.loads((tmp_path / converted.SOURCE_FILE).read_text()) == key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = prompt(24, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    text = "w3 w17 w99 nothing"
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == tokenizer(text).input_ids


@requires_real_model
def test_an_unwritable_cache_folder_is_an_error_before_any_conversion(monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("POLYKV_CACHE_DIR", str(blocked))
    with pytest.raises(polykv.ModelError) as error:
        polykv.load_default_model()
    message = str(error.value)
    assert message.startswith(f"cannot keep the converted model in {blocked}: ")
    assert "POLYKV_CACHE_DIR to a writable folder, or POLYKV_CACHE_DIR=none" in message


@requires_real_model
def test_default_names_the_bundled_model_and_so_does_its_path():
    bundled = default_model_location()
    assert bundled.name == DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert locate("default") == bundled
    assert locate(bundled.directory) == bundled
    assert locate(bundled.directory / bundled.gguf_file) == bundled


@requires_real_model
def test_validate_takes_model_default(converted_model, tmp_path, capsys):
    spec = tmp_path / "spec.pkv"
    spec.write_text("layers 0-1: full\nlayers 2-29: snapkv@256\n")
    assert main(["validate", str(spec), "--model", "default"]) == 0
    assert capsys.readouterr().out.startswith(f"{spec}: ok (30 layers)\n")

    spec.write_text("model layers 32\n*: snapkv@256\n")
    assert main(["validate", str(spec), "--model", "default"]) == 1
    err = capsys.readouterr().err
    assert "this spec is written for 32 layers, but the model (SmolLM2-135M-Instruct) has 30" in err
    assert "site-packages" not in err and os.environ["POLYKV_CACHE_DIR"] not in err


#: Loads the bundled model as the environment says and saves its logits for the ids given: in a process of its
#: own, so that the suite never holds the model while reading the GGUF file (about 1.3 GB at its peak).
LOGITS = """
import sys, torch, polykv
model, tokenizer = polykv.load_default_model()
ids = torch.load(sys.argv[1])
with torch.no_grad():
    torch.save({"logits": model(ids).logits, "from_gguf": getattr(model, "hf_quantizer", None) is not None,
                "ids": tokenizer(sys.argv[3], return_tensors="pt").input_ids}, sys.argv[2])
"""


def logits_in_a_process_of_its_own(ids: torch.Tensor, text: str, folder: Path, **environment: str):
    torch.save(ids, folder / "ids.pt")
    command = [sys.executable, "-c", LOGITS, str(folder / "ids.pt"), str(folder / "out.pt"), text]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "out.pt"), done.stderr


def chat_text(tokenizer) -> str:
    messages = [{"role": "user", "content": "What is the pass key? It is 72514."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
@pytest.mark.heavy
def test_the_converted_model_is_the_gguf_files_and_a_stale_one_is_rebuilt_once(converted_model, tmp_path, monkeypatch):
    """The suite's converted folder and the GGUF file read again give the same tokens and logits; a folder
    converted by an older transformers is rebuilt once, with a progress bar, into the same model. (One test, so
    that the three processes share the suite's logits.)"""
    bundled = default_model_location()
    gguf = bundled.directory / bundled.gguf_file
    folder = converted.fresh_folder(bundled.name, gguf)
    assert folder is not None and folder.is_relative_to(os.environ["POLYKV_CACHE_DIR"])
    kept = json.loads((folder / converted.SOURCE_FILE).read_text())
    assert kept["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert kept["transformers"] == transformers.__version__

    tokenizer = polykv.model.load_tokenizer()
    text = chat_text(tokenizer)
    ids = tokenizer(text, return_tensors="pt").input_ids
    kept_run, _ = logits_in_a_process_of_its_own(ids, text, tmp_path)  # the suite's cache folder
    gguf_run, _ = logits_in_a_process_of_its_own(ids, text, tmp_path, POLYKV_CACHE_DIR="none")
    assert not kept_run["from_gguf"] and gguf_run["from_gguf"]  # read from the converted folder, then the file
    assert torch.equal(kept_run["ids"], ids) and torch.equal(gguf_run["ids"], ids)  # the same tokenizer
    assert torch.equal(kept_run["logits"], gguf_run["logits"])

    stale = tmp_path / "cache" / "models" / bundled.name
    stale.mkdir(parents=True)
    (stale / converted.SOURCE_FILE).write_text(json.dumps({**converted.source_key(gguf), "transformers": "4.0.0"}))
    (stale / "model.safetensors").write_bytes(b"converted by an older transformers")
    cache = str(tmp_path / "cache")
    rebuilt, err = logits_in_a_process_of_its_own(ids, text, tmp_path, POLYKV_CACHE_DIR=cache)
    assert f"converting {bundled.name} to float32 (once)" in err and "3/3" in err
    assert json.loads((stale / converted.SOURCE_FILE).read_text()) == converted.source_key(gguf)
    assert [p.name for p in stale.parent.iterdir()] == [bundled.name]  # no staging or stale folder left
    assert torch.equal(rebuilt["logits"], kept_run["logits"])
    monkeypatch.setenv("POLYKV_CACHE_DIR", cache)
    assert converted.fresh_folder(bundled.name, gguf) == stale  # the next load reads it as it is


def test_plans_and_profiles_name_models_without_a_path(tmp_path):
    folder = tmp_path / "my-tiny"
    tiny_model("llama").save_pretrained(folder)
    model = polykv.model.load_weights(folder)
    document = polykv.compile("layers *: streaming@16", model).to_json()
    assert json.loads(document)["model"]["name"] == "my-tiny"
    assert str(tmp_path) not in document
    shipped = polykv.default_profile()
    assert shipped.model.name == "SmolLM2-135M-Instruct"
    assert shipped.settings["model"] == "SmolLM2-135M-Instruct"
