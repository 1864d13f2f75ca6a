"""Tasks: retrieval and continuation prompts generated offline, and the user's own in JSON lines."""
