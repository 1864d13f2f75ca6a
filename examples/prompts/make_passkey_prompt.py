"""Writes passkey-1k.txt, the prompt of the README's main command (about 1k tokens, key at 40% depth)."""

from pathlib import Path

from polykv.tasks.tasks import passkey_prompt

if __name__ == "__main__":
    path = Path(__file__).with_name("passkey-1k.txt")
    path.write_text(passkey_prompt(filler_repeats=40, depth=0.4, key=72514))
    print(f"wrote {path}")
