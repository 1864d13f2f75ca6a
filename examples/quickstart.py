"""polykv in a few lines: compile a spec against the bundled model, answer a long prompt, and see
what each layer kept.

    python examples/quickstart.py
"""

from pathlib import Path

import torch

import polykv
from polykv.language.printer import layer_ranges

model, tokenizer = polykv.load_default_model()  # or polykv.load_model("path/to/a/local/model")
plan = polykv.compile("layers 0-1: full; *: snapkv@256", model)  # or a pathlib.Path of a spec file

prompt = (Path(__file__).parent / "prompts" / "passkey-1k.txt").read_text()
ids = tokenizer(prompt, return_tensors="pt").input_ids
cache = plan.make_cache()  # one cache per request; the plan is reusable
# The cache goes in as cache=cache (transformers 5.24 and later) or past_key_values=cache (earlier);
# polykv.cache_argument picks the keyword the installed transformers takes.
out = model.generate(ids, **polykv.cache_argument(model, cache), max_new_tokens=8, do_sample=False)

print("answer:", tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
print("tokens stored per layer:", cache.layer_lengths())
print(f"cache: {cache.nbytes() / 2**20:.1f} MiB, the full cache would hold {cache.full_nbytes() / 2**20:.1f} MiB")

# Let polykv choose each layer's policy and budget (a profile for the bundled model ships with it):
routed = polykv.compile("budget 128\nlayers *: auto@auto", model, tokenizer=tokenizer)
for indices, what in routed.runs():
    print(f"layers {layer_ranges(indices)}: {what}")

# One compressed context, several questions: prefill once, end the prefill, then ask and rewind.
context = prompt.rsplit("\n", 1)[0]  # the passkey text without its question
context_ids = tokenizer(context, return_tensors="pt").input_ids
cache = routed.make_cache()
model(context_ids, **polykv.cache_argument(model, cache))
cache.end_prefill()  # later forwards append: the context stays compressed as it is
for question in ["\nWhat is the pass key? The pass key is", "\nRepeat the pass key: "]:
    question_ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([context_ids, question_ids], dim=1)
    out = model.generate(ids, **polykv.cache_argument(model, cache), max_new_tokens=8, do_sample=False)
    print(repr(question.strip()), "->", tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    cache.rewind(context_ids.shape[1])  # forget the question and answer; keep the compressed context
