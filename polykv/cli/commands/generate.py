"""``polykv generate``: answer a prompt with a compressed cache, and report what it kept and cost.

The prompt is continued as written (``--chat`` wraps it in the model's chat template first), with
the likeliest token at each step, or drawn (``--temperature``, ``--top-k``, ``--top-p``; seeded by
``--seed``) in every way of decoding: transformers' ``generate``, ``--static`` and ``--draft-spec``.
Progress shows while the model loads, while the prompt is prefilled (layer by layer) and while
tokens are generated; the report gives kept tokens per layer after prefill, the cache's memory
against the full cache's, and the time of each stage.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from polykv.cli.commands import setup
from polykv.cli.commands.output import mib, table
from polykv.cli.commands.setup import spec_argument
from polykv.decoding import Sampling, speculative_generate, static_generate
from polykv.decoding.speculative import DEFAULT_LOOKAHEAD
from polykv.errors import PolykvError
from polykv.files import read_text
from polykv.language.check import check
from polykv.language.parse import parse
from polykv.language.printer import layer_ranges
from polykv.limits import MAX_PROMPT_BYTES, PROMPT_BYTES_PER_POSITION
from polykv.model import attention_modules, load_model
from polykv.model.describe import cache_argument
from polykv.plan import Plan, compile, with_total_budget


def run(args: argparse.Namespace) -> int:
    text = (
        args.prompt if args.prompt is not None else read_text(args.prompt_file, limit=MAX_PROMPT_BYTES, what="prompt")
    )
    if not text.strip():
        raise PolykvError("the prompt is empty")
    drafting = args.draft_spec is not None
    if args.compile and not (args.static or drafting):
        raise PolykvError("--compile compiles static decoding steps: add --static (or give a --draft-spec)")
    if args.lookahead is not None and not drafting:
        raise PolykvError("--lookahead is how many tokens a draft proposes per check: give the draft's --draft-spec")
    for given, option in ((args.draft_tf32, "--draft-tf32"), (args.draft_dtype, "--draft-dtype")):
        if given and not drafting:
            raise PolykvError(f"{option} is the precision a draft proposes in: give the draft's --draft-spec")
    if args.draft_tf32 and args.draft_dtype:
        raise PolykvError(
            f"--draft-tf32 is for a draft in float32, and --draft-dtype {args.draft_dtype} drafts in "
            f"{args.draft_dtype}: give one of them"
        )
    spec = parse(args.draft_spec, source="--draft-spec") if drafting else spec_argument(args, "--spec")
    if args.budget is not None:
        spec = with_total_budget(spec, args.budget, given_as="--budget")
    checked = check(spec)  # report mistakes in the spec before spending time on the model
    setup.only_for_auto(checked, {"--profile": args.profile, "--objective": args.objective})
    device = setup.device(args)
    if args.draft_tf32 and (device != "cuda" or args.dtype != "float32"):
        raise PolykvError(
            f"--draft-tf32 has CUDA's float32 matrix products use TF32, which this run ({args.dtype} on {device}) "
            "has none of: drop it, or run with --device cuda --dtype float32"
        )
    location = setup.model_location(args)

    started = time.perf_counter()
    print(f"loading {location.name} ({args.dtype}, {device}, {args.attention})", file=sys.stderr)
    model, tokenizer = load_model(location, dtype=args.dtype, device=device, attn_implementation=args.attention)
    loaded = time.perf_counter() - started
    objective = args.objective or ("acceptance" if drafting else "kl")
    plan = compile(spec, model, profile=args.profile, tokenizer=tokenizer, objective=objective)

    input_ids = _prompt_ids(args, text, model, tokenizer)
    sampling = _sampling(args)
    torch.manual_seed(args.seed)
    if drafting:
        return _speculate(args, model, tokenizer, plan, input_ids, loaded, sampling)
    cache = plan.make_cache(prompt_length=input_ids.shape[1])
    first = "capturing the static step's CUDA graph" if input_ids.is_cuda else "the first static step"
    before = f"an ordinary step, then {first}" + (", compiled first" if args.compile else "")
    progress = _Progress(model, input_ids.shape[1], args.max_new_tokens, static=args.static, static_setup=before)
    with progress, torch.no_grad():
        if args.static:
            output = static_generate(
                model,
                cache,
                input_ids,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                on_token=progress.token,
                sampling=sampling,
                compile_step=args.compile,
            )
        else:
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                **cache_argument(model, cache),
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **_generate_sampling(sampling),
            )
        new_tokens = output[0, input_ids.shape[1] :].tolist()  # waits for the device
        progress.finish()
    print(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    print()
    print(_report(plan.resolved(input_ids.shape[1]), progress, loaded, len(new_tokens)))
    return 0


def _sampling(args: argparse.Namespace) -> Sampling | None:
    """The draws the sampling options ask for, or None: the likeliest token."""
    if args.temperature is None and args.top_k is None and args.top_p is None:
        return None
    return Sampling(temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p)


def _generate_sampling(sampling: Sampling | None) -> dict:
    """transformers' ``generate`` options for ``sampling`` (0 and 1 switch its top-k and top-p off, whatever
    the model's generation config sets)."""
    if sampling is None:
        return {"do_sample": False}
    top_k, top_p = sampling.top_k or 0, 1.0 if sampling.top_p is None else sampling.top_p
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": top_k, "top_p": top_p}


def _speculate(
    args: argparse.Namespace, model, tokenizer, draft: Plan, input_ids: torch.Tensor, loaded: float,
    sampling: Sampling | None,
) -> int:  # fmt: skip
    """Self-speculation: the full cache's own output, drafted by ``draft``'s cache; report how well it guessed."""
    lookahead = args.lookahead or DEFAULT_LOOKAHEAD
    started = time.perf_counter()
    result = speculative_generate(
        model,
        input_ids,
        draft=draft,
        max_new_tokens=args.max_new_tokens,
        lookahead=lookahead,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        static=True if args.static or args.compile else None,  # by default: fixed shapes where they can run
        sampling=sampling,
        compile_step=args.compile,
        draft_tf32=args.draft_tf32,
        draft_dtype=getattr(torch, args.draft_dtype) if args.draft_dtype else None,
    )
    new_tokens = result.tokens[0, input_ids.shape[1] :].tolist()  # waits for the device
    seconds = time.perf_counter() - started
    print(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    print()
    runs = draft.resolved(input_ids.shape[1]).runs()
    print(table([("layers", "draft policy")] + [(layer_ranges(indices), what) for indices, what in runs]))
    print(
        f"speculation: lookahead {lookahead}, {result.accepted} of {result.drafted} drafted tokens accepted "
        f"({100 * result.acceptance:.1f}%), {result.tokens_per_step:.2f} tokens per check of the full cache"
    )
    print(
        f"time: load {loaded:.1f} s, prefill and generate {seconds:.2f} s "
        f"({len(new_tokens)} tokens, {len(new_tokens) / seconds:.1f} tokens/s)"
    )
    return 0


def _prompt_ids(args: argparse.Namespace, text: str, model, tokenizer) -> torch.Tensor:
    """The prompt's token ids (1, L), once it is known to fit the model's positions with the tokens to generate.

    A text too long to fit is refused before it is tokenized, which costs time and memory in proportion to it.
    """
    given = "--prompt" if args.prompt is not None else f"--prompt-file {args.prompt_file}"
    size = len(text.encode())
    fewest = -(-size // PROMPT_BYTES_PER_POSITION)
    setup.within_positions(
        model,
        fewest,
        f"{given}: {size:,} bytes of text (at least {fewest:,} tokens of {PROMPT_BYTES_PER_POSITION} bytes)",
    )
    ids = _tokenize(tokenizer, text, chat=args.chat).to(model.device)
    length, new = ids.shape[1], args.max_new_tokens
    setup.within_positions(model, length, f"{given}: {length:,} tokens")
    setup.within_positions(
        model, length + new, f"--max-new-tokens {new:,}: the prompt's {length:,} tokens and {new:,} more"
    )
    return ids


def _tokenize(tokenizer, text: str, *, chat: bool) -> torch.Tensor:
    if not chat:
        return tokenizer(text, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise PolykvError("--chat: this model's tokenizer has no chat template")
    messages = [{"role": "user", "content": text}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


class _Progress:
    """Progress bars and timings from forward hooks: the first forward is the prefill, one bar per layer.

    With ``static`` decoding the forwards after the prefill are captured once and replayed, so tokens
    are counted by ``token`` (called by ``static_generate``) and timed as a whole by ``finish``, split
    where the set-up ends: an ordinary step, then the first static step, which captures the step's
    CUDA graph (and compiles it, with ``--compile``).
    """

    #: Tokens static_generate makes before its steps replay: the prefill's, the ordinary step's, the first static one.
    STATIC_SETUP_TOKENS = 3

    def __init__(
        self, model: torch.nn.Module, prompt_length: int, max_new_tokens: int, *, static: bool = False,
        static_setup: str = "",
    ):  # fmt: skip
        """``static_setup`` says in words what static decoding does before its steps replay (for the report)."""
        self.model = model
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.static = static
        self.forwards = 0
        self.kept_after_prefill: list[int] = []
        self.nbytes_after_prefill = self.full_nbytes_after_prefill = 0
        self.prefill_seconds = self.decode_seconds = self.setup_seconds = 0.0
        self.static_setup = static_setup
        self._tokens_made = 0
        self._hooks: list = []
        self._layer_hooks: list = []  # removed after the prefill, whose bar they drive

    def __enter__(self) -> _Progress:
        attention = attention_modules(self.model).values()
        self._layers_bar = tqdm(
            total=len(attention), desc=f"prefill {self.prompt_length} tokens", unit="layer", file=sys.stderr
        )
        self._tokens_bar: tqdm | None = None  # made when the prefill ends
        self._depth = 0  # model forwards under way: reconstruction runs its own inside the prompt's
        for module in attention:
            self._layer_hooks.append(module.register_forward_hook(self._after_layer))
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward))
        self._hooks.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks + self._layer_hooks:
            hook.remove()
        self._layers_bar.close()
        if self._tokens_bar is not None:
            self._tokens_bar.close()

    def _after_layer(self, module, args, output) -> None:
        if self.forwards == 0 and self._depth == 1:  # the prompt's own pass, not a repeat inside it (kvzip)
            self._layers_bar.update(1)

    # The model's hooks count on the host: torch.compile (--compile) would guard on the counts and compile every step.
    @torch.compiler.disable
    def _before_forward(self, module, args) -> None:
        self._depth += 1
        if self._depth == 1:
            self._started = time.perf_counter()

    def token(self) -> None:
        """One more token queued (static decoding)."""
        assert self._tokens_bar is not None  # queued after the prefill
        self._tokens_bar.update(1)
        self._tokens_made += 1
        if self._tokens_made == self.STATIC_SETUP_TOKENS:
            self.setup_seconds = time.perf_counter() - self._prefilled

    def finish(self) -> None:
        """Generation is over: static decoding's time is everything after the prefill."""
        if self.static:
            self.decode_seconds = time.perf_counter() - self._prefilled

    @torch.compiler.disable
    def _after_forward(self, module, args, kwargs, output) -> None:
        self._depth -= 1
        if self._depth:  # a forward the model runs inside one of the caller's (the reconstruction's repeat)
            return
        seconds = time.perf_counter() - self._started
        self.forwards += 1
        if self.forwards == 1:
            # transformers renames the argument to ``cache`` (5.24 passes that; 5.17 past_key_values).
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            self.prefill_seconds = seconds
            self.kept_after_prefill = cache.layer_lengths()
            self.nbytes_after_prefill = cache.nbytes()
            self.full_nbytes_after_prefill = cache.full_nbytes()
            self._layers_bar.close()
            for hook in self._layer_hooks:  # in every layer of a compiled step, they would break its graph
                hook.remove()
            self._layer_hooks = []
            self._tokens_bar = tqdm(total=self.max_new_tokens, desc="generate", unit="token", file=sys.stderr)
            self._prefilled = time.perf_counter()
        elif not self.static:  # static steps are captured once and replayed: finish() times them
            self.decode_seconds += seconds
        if not self.static:  # static_generate counts its tokens through token()
            assert self._tokens_bar is not None  # made by the first forward, the prefill
            self._tokens_bar.update(1)


def _report(plan: Plan, progress: _Progress, load_seconds: float, new_tokens: int) -> str:
    rows = [("layers", "policy", "kept after prefill")]
    for indices, what in plan.runs():
        lengths = sorted({progress.kept_after_prefill[i] for i in indices})
        rows.append((layer_ranges(indices), what, f"{'/'.join(map(str, lengths))} of {progress.prompt_length}"))
    lines = [table(rows)]
    kept, full = progress.nbytes_after_prefill, progress.full_nbytes_after_prefill
    saved = 100 * (1 - kept / full) if full else 0.0
    lines.append(f"cache after prefill: {mib(kept)} kept, {mib(full)} for the full cache ({saved:.1f}% saved)")
    # The prefill forward yields the first token; the rest come from the decoding steps.
    decoding = f", {(new_tokens - 1) / progress.decode_seconds:.1f} tokens/s" if progress.decode_seconds else ""
    lines.append(
        f"time: load {load_seconds:.1f} s, prefill {progress.prefill_seconds:.2f} s, "
        f"generate {progress.decode_seconds:.2f} s ({new_tokens} tokens{decoding})"
    )
    replayed = new_tokens - progress.STATIC_SETUP_TOKENS
    if progress.setup_seconds and replayed > 0:
        rest = progress.decode_seconds - progress.setup_seconds
        lines.append(
            f"static decoding: set-up {progress.setup_seconds:.2f} s ({progress.static_setup}), "
            f"then {replayed} tokens in {rest:.2f} s ({replayed / rest:.1f} tokens/s)"
        )
        if progress.setup_seconds > rest:
            lines.append(
                "  the set-up took most of the time: static decoding pays over longer generations "
                "(more --max-new-tokens), or leave out --static"
            )
    return "\n".join(lines)
