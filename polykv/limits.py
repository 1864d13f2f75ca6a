"""The bounds on sizes a user controls, stated once and checked before any work starts.

Each bound is far above what a real model or spec needs, and low enough that checking an input at
the bound stays cheap in time and memory: a spec or a command that passes them cannot make polykv
allocate without limit.
"""

#: Decoder layers of a model, from ``model layers N``, ``--layers N``, ``check(layers=N)`` or a model's
#: configuration. The largest released models have a few hundred.
MAX_LAYERS = 10_000

#: KV heads of a layer, from ``model layers N heads H``, ``--heads H``, ``check(heads=H)`` or a model's configuration.
MAX_HEADS = 4_096
