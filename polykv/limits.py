"""The bounds on sizes a user controls, stated once and checked before any work starts.

Each bound is far above what a real model or spec needs, and low enough that checking an input at
the bound stays cheap in time and memory: a spec or a command that passes them cannot make polykv
allocate without limit. docs/limits.md lists them with the error each one gives.
"""

#: Decoder layers of a model, from ``model layers N``, ``--layers N``, ``check(layers=N)`` or a model's
#: configuration. The largest released models have a few hundred.
MAX_LAYERS = 10_000

#: KV heads of a layer, from ``model layers N heads H``, ``--heads H``, ``check(heads=H)`` or a model's configuration.
MAX_HEADS = 4_096

#: Statements in a spec: one per layer of the largest model polykv takes, and a few settings. A spec names
#: each layer (or each run of a layer's heads) once; real ones need tens of statements, per-head ones hundreds.
MAX_STATEMENTS = MAX_LAYERS + 3

#: Tokens of a spec (words, numbers and punctuation marks, a string counting as one), counted before parsing:
#: parsing costs some 20 microseconds and 1 KB of memory a token. A statement takes some 25 at most
#: (``layers 9999: snapkv@64(window=8, kernel=7) decode streaming@128(sink=4)``), so MAX_STATEMENTS of them fit.
MAX_TOKENS = 250_000

#: Bytes of a spec file or text: a spec of MAX_STATEMENTS statements with a comment on each fits easily.
MAX_SPEC_BYTES = 8 * 2**20

#: Digits of a whole number written in a spec. Counts, indices and parameters need a handful; converting a
#: longer literal costs time quadratic in its length (Python refuses past 4,300 digits).
MAX_NUMBER_DIGITS = 100

#: Errors about one spec reported in full; the others are counted, so a spec that is all errors is
#: reported in time linear in its size, and readably.
MAX_REPORTED_ERRORS = 100

#: Bytes of a prompt file, read before the model loads: some 16 million tokens, past any model's context.
MAX_PROMPT_BYTES = 64 * 2**20

#: Bytes of prompt text per position of the model, checked before tokenizing: a token of real text is
#: about 4 bytes, so a prompt longer than this cannot fit the model's positions.
PROMPT_BYTES_PER_POSITION = 32

#: Bytes of a profile or plan document: the bundled profile is 0.3 MB, one for 10,000 layers some 100 MB.
MAX_DOCUMENT_BYTES = 256 * 2**20

#: Bytes of a JSON-lines data file (``eval --data``, ``calibrate --data``): LongBench's largest task is
#: some 60 MB.
MAX_DATA_BYTES = 256 * 2**20

#: Bytes of a model's ``config.json``: a configuration is a few kilobytes.
MAX_CONFIG_BYTES = 16 * 2**20
