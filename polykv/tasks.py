"""Synthetic long-context prompts, generated locally (nothing is downloaded).

``passkey_prompt`` hides a number in repeated filler text and asks for it back; the prompt ends
with the answer's lead-in, so a model answers by continuing it. The bundled SmolLM2-135M finds
the key reliably up to about 1k tokens with the full cache, which makes this the task to check
that compression keeps what matters.
"""

from __future__ import annotations

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRODUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(filler_repeats: int, depth: float, key: int) -> str:
    """A prompt with ``key`` after ``depth`` (0 to 1) of ``filler_repeats`` filler paragraphs.

    With SmolLM2's tokenizer 40 repeats make a prompt of 1,027 tokens (about 24 per repeat).
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth is between 0 and 1, got {depth}")
    before = round(filler_repeats * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return INTRODUCTION + FILLER * before + needle + FILLER * (filler_repeats - before) + QUESTION
