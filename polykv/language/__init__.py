"""The polykv language: syntax tree, parsing, printing, checking and diagnostics."""
