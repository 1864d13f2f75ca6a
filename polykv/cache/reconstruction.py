"""Reconstruction scoring: how much each prompt token matters for repeating the prompt (KVzip).

KVzip (Kim et al. 2025, arXiv 2505.23416) scores a prompt's keys and values without knowing the
question to come: after the prompt, the model is asked to repeat it, and a token's score is the
most attention any repeating query pays it. The prompt is repeated in chunks (``Reconstruction``):
each chunk's input is an instruction ("Repeat the previous context exactly."; for later chunks
"... starting with" and the last tokens of the previous chunk), the end of a chat turn where the
model has a chat template, then the chunk itself. The model runs on that input with the whole
prompt cached, exactly as it would answer; the scores are computed on the side, as the published
method computes them: each repeating query's softmax over the prompt's first tokens (sinks), the
chunk being repeated and the repeat so far, then the maximum over queries and a KV head's query
heads of the weight on each token of the chunk.

The repeat's own keys and values leave the cache after each chunk: what stays is the prompt, its
tokens scored (``PolyLayer`` keeps the running maximum per row, KV head and token).
"""

from __future__ import annotations

import attrs
import torch

from polykv.cache.inputs import grouped
from polykv.cache.positions import prompt_positions
from polykv.converters import ints

#: Tokens of the prompt's start every repeating query may attend to besides its chunk (KVzip's sinks).
SINKS = 4
#: Queries scored at once (their attention over the stored tokens is materialised per block).
QUERY_BLOCK = 128


@attrs.frozen
class Reconstruction:
    """The token ids that ask a model to repeat its prompt, and how it is cut into chunks.

    ``first`` starts the first chunk's request, ``later`` the others' (followed by the last
    ``overlap`` tokens of the previous chunk); ``turn`` closes the request (a chat template's end of
    the user's turn and start of the assistant's, or a newline).
    """

    first: tuple[int, ...] = attrs.field(converter=ints)
    later: tuple[int, ...] = attrs.field(converter=ints)
    turn: tuple[int, ...] = attrs.field(converter=ints)
    chunk: int = 2048
    overlap: int = 8

    @classmethod
    def for_tokenizer(cls, tokenizer) -> Reconstruction:
        """The request as KVzip words it, in ``tokenizer``'s vocabulary and chat template."""

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        turn = "\n"
        if getattr(tokenizer, "chat_template", None):
            placeholder = "\n" + "#" * 13
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "dummy context" + placeholder}], add_generation_prompt=True, tokenize=False
            )
            turn = text.split(placeholder, 1)[1]
        return cls(
            encode("\n\nRepeat the previous context exactly."),
            encode("\n\nRepeat the part of the previous context exactly, starting with"),
            encode(turn),
        )

    def chunks(self, length: int) -> list[tuple[int, int]]:
        """The (start, end) prompt columns each chunk repeats."""
        return [(start, min(start + self.chunk, length)) for start in range(0, length, self.chunk)]

    def inputs(
        self, prompt: torch.Tensor, mask: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The repeat of columns ``start:end`` of ``prompt`` (B, L) with its ``mask``: input ids (B, n), the
        attention mask of prompt and repeat (B, L + n), and the repeat's position ids (B, n)."""
        rows = prompt.shape[0]
        request = self.first if start == 0 else self.later
        lead = torch.tensor(request, dtype=prompt.dtype, device=prompt.device).expand(rows, -1)
        turn = torch.tensor(list(self.turn), dtype=prompt.dtype, device=prompt.device).expand(rows, -1)
        pieces, masks = [lead], [torch.ones_like(lead)]
        if start > 0:
            tail = max(0, start - self.overlap)
            pieces.append(prompt[:, tail:start])
            masks.append(mask[:, tail:start])
        pieces += [turn, prompt[:, start:end]]
        masks += [torch.ones_like(turn), mask[:, start:end]]
        ids, repeat_mask = torch.cat(pieces, dim=1), torch.cat(masks, dim=1).to(mask.dtype)
        whole = torch.cat([mask, repeat_mask], dim=1)
        return ids, whole, prompt_positions(whole)[:, -ids.shape[1] :]


@attrs.define
class Scoring:
    """One chunk being repeated, seen from one layer: which prompt positions it covers, and the scores so far."""

    prompt_length: int
    start: int
    end: int
    scores: torch.Tensor  # (B, H, prompt_length) float32: the most attention each prompt token received

    def add(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
        real: torch.Tensor,
        scaling: float,
    ) -> None:
        """Score the chunk with the repeat's ``queries`` (B, Hq, n, D) against the stored ``keys`` (B, H, S, D).

        ``positions`` (B, H, S) are the stored tokens' positions (the prompt's, then the repeat's),
        ``real`` (B, seen) says which positions hold real tokens. Each real query sees the sinks,
        the chunk, and the repeat up to itself; its softmax over those gives the weights.
        """
        batch, kv_heads = keys.shape[:2]
        new = queries.shape[-2]
        seen = real.shape[-1]
        prompt = self.prompt_length
        rank = real[:, :prompt].long().cumsum(-1)  # 1 for the first real prompt token, 2 for the next...
        sink = real[:, :prompt] & (rank <= min(SINKS, self.start))
        sink = torch.cat([sink, torch.zeros_like(real[:, prompt:])], dim=1)
        at = torch.arange(seen, device=keys.device)
        wanted = real & (sink | ((at >= self.start) & (at < self.end)) | (at >= prompt))  # (B, seen) by position
        stored = wanted[:, None, :].expand(batch, kv_heads, seen).gather(-1, positions)  # (B, H, S)
        in_chunk = (positions >= self.start) & (positions < self.end)
        grouped_queries = grouped(queries, kv_heads).float()  # (B, H, G, n, D)
        query_real = real[:, seen - new :]
        for first in range(0, new, QUERY_BLOCK):
            block = grouped_queries[..., first : first + QUERY_BLOCK, :]
            count = block.shape[-2]
            logits = torch.einsum("bhgnd,bhsd->bhgns", block, keys.float()) * scaling
            query_at = seen - new + first + torch.arange(count, device=keys.device)
            causal = positions[:, :, None, :] <= query_at[None, None, :, None]  # (B, H, n, S)
            visible = (stored[:, :, None, :] & causal)[:, :, None]  # (B, H, 1, n, S)
            weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
            weights = weights * query_real[:, None, None, first : first + count, None]
            best = weights.amax(dim=(2, 3)).masked_fill(~in_chunk, 0.0)  # (B, H, S)
            index = positions.clamp(max=prompt - 1)
            self.scores.scatter_reduce_(-1, index, best, reduce="amax")
