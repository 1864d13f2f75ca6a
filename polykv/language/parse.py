"""Text to syntax tree: the Lark grammar, syntax errors in plain words, and recovery.

On a syntax error the parser reports it, blanks the statement it occurred in (keeping every
other character where it was, so later positions stay right) and parses again, so one run
reports the syntax errors of every statement and still returns the statements that parse.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.resources
import json
import math
from pathlib import Path

import attrs
import lark
from lark import Token, Transformer, v_args

from polykv.arguments import instance
from polykv.errors import ArgumentTypeError, PolykvError
from polykv.files import UnreadableFile
from polykv.language import ast
from polykv.language.diagnostics import Diagnostic, SpecError
from polykv.language.source import Source, Span, read_source
from polykv.language.statements import Statements
from polykv.limits import MAX_NUMBER_DIGITS, MAX_STATEMENTS, MAX_TOKENS

#: Syntax errors reported before parsing gives up on a text.
MAX_SYNTAX_ERRORS = 50

_COMMENTS: contextvars.ContextVar[list[Token]] = contextvars.ContextVar("polykv_comments")


def _collect_comment(token: Token) -> Token:
    _COMMENTS.get().append(token)
    return token


@functools.cache
def lark_parser() -> lark.Lark:
    """The language's Lark parser (LALR, with positions), built once from the grammar shipped in the package."""
    try:
        grammar = importlib.resources.files("polykv.grammar").joinpath("polykv.lark").read_text()
    except ModuleNotFoundError:  # the repository's grammar/ becomes polykv.grammar when the package is installed
        raise PolykvError(
            f"polykv's grammar is missing beside {Path(__file__).parents[1]}: this polykv was not installed (the "
            "wheel and `pip install -e .` put the repository's grammar/ inside the package); install it"
        ) from None
    return lark.Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
        lexer_callbacks={"COMMENT": _collect_comment},
    )


def parse(text: str, source: str = "<string>") -> ast.Spec:
    """Parse spec ``text``; ``source`` names it in messages. Raises SpecError listing every syntax error."""
    if isinstance(text, bytes):
        raise ArgumentTypeError("text is a str, not bytes: decode it first, text.decode('utf-8')")
    instance(text, str, "text", "spec text (a str)")
    instance(source, str, "source", "a name for messages (a str)")
    spec, diagnostics = parse_recovering(text, source)
    if diagnostics:
        raise SpecError(diagnostics)
    return spec


def load(path: str | Path) -> ast.Spec:
    """Parse the spec file at ``path`` (any suffix; ``-`` reads standard input)."""
    instance(path, (str, Path), "path", "the path of a spec file (a str or pathlib.Path)")
    return parse(*_read(path))


def _read(path: str | Path) -> tuple[str, str]:
    try:
        source = read_source(path)
    except UnreadableFile as error:
        raise SpecError([Diagnostic("unreadable-file", str(error))]) from None
    return source.text, source.name


def parse_recovering(text: str, source: str = "<string>") -> tuple[ast.Spec, list[Diagnostic]]:
    """Parse as much of ``text`` as possible: the spec of the statements that parse, and the errors.

    After a syntax error the parser blanks the statement it is in and goes on from that statement,
    so the text is parsed about twice in all, however many errors it has.
    """
    src = Source(source, text)
    statements = Statements.of(text)
    if statements.count() > MAX_STATEMENTS:
        return ast.Spec(source_name=source), [_too_many_statements(src, statements)]
    if statements.tokens() > MAX_TOKENS:
        return ast.Spec(source_name=source), [_too_many_tokens(src, statements)]
    diagnostics: list[Diagnostic] = []
    working, start = text, 0  # the text before ``start`` is known to parse
    while True:
        comments: list[Token] = []
        token = _COMMENTS.set(comments)
        try:
            tree = lark_parser().parse(working[start:])
        except lark.UnexpectedInput as error:
            diagnostic, offset = _syntax_diagnostic(error, src, working, start)
            diagnostics.append(diagnostic)
            first, end = statements.bounds(offset)
            if not working[first:end].strip():  # nothing left to take out: report what was found
                return ast.Spec(source_name=source), diagnostics
            if len(diagnostics) == MAX_SYNTAX_ERRORS:
                diagnostics.append(
                    Diagnostic(
                        "too-many-errors",
                        f"stopped after {MAX_SYNTAX_ERRORS} syntax errors",
                        Span.at(src, offset, offset),
                        hint="fix these and check again",
                    )
                )
                return ast.Spec(source_name=source), diagnostics
            working, start = working[:first] + " " * (end - first) + working[end:], first
            continue
        finally:
            _COMMENTS.reset(token)
        if start == 0:
            spec, invalid = _Builder(src, comments).build(tree)
            return spec, sorted(diagnostics + invalid, key=lambda d: _span(d).start)
        start = 0  # every error is blanked: parse the whole text once more, for its tree


def _too_many_statements(src: Source, statements: Statements) -> Diagnostic:
    offset = statements.start_of(MAX_STATEMENTS)
    assert offset is not None  # there are more statements than that
    return Diagnostic(
        "too-many-statements",
        f"a spec has at most {MAX_STATEMENTS:,} statements (one per layer of the largest model polykv takes, "
        f"and a few settings); "
        f"this one has {statements.count():,}",
        Span.at(src, offset, offset + 1),
        hint="name runs of layers in one statement (`layers 0-31: snapkv@256`) or use `*`",
    )


def _too_many_tokens(src: Source, statements: Statements) -> Diagnostic:
    offset = statements.token_start(MAX_TOKENS)
    return Diagnostic(
        "too-many-tokens",
        f"a spec has at most {MAX_TOKENS:,} words, numbers and punctuation marks (outside comments); "
        f"this one has {statements.tokens():,}",
        Span.at(src, offset, offset + 1),
        hint="name runs of layers with ranges (`layers 0-31: snapkv@256`) or use `*`; each layer once",
    )


# --- syntax errors in words a user knows ----------------------------------------------------------

# Terminal groups that mean one thing together, tried in order; what is left is named one by one.
_GROUPS: list[tuple[frozenset[str], str]] = [
    (
        frozenset({"LAYERS", "MODEL", "BUDGET", "PREFILL", "SOLVER", "INT", "STAR"}),
        "a statement such as `layers 0-3: snapkv@256`, `budget 512`, `prefill <= 1.5x`, `solver pyramid` or "
        "`model layers 32`",
    ),
    (
        frozenset({"INT", "PERCENT", "AUTO"}),
        "a budget: a number of tokens such as 64, a percentage such as 10%, or `auto`",
    ),
    (
        frozenset({"INT", "PERCENT", "TOTAL"}),
        "a budget: a number of tokens per layer such as 512, `total` and a number, or a percentage such as 10%",
    ),
    (frozenset({"INT", "STAR"}), "a layer selector such as 3, 0-3, 0,2,5, -1 or *"),
    (frozenset({"NAME", "AUTO"}), "a policy name (or `auto`)"),
    (
        frozenset({"INT", "FLOAT", "STRING", "TRUE", "FALSE"}),
        "a value: a number, `true`, `false` or a string in double quotes",
    ),
    (frozenset({"NAME", "RPAR"}), "a parameter name or `)`"),
    (frozenset({"_SEP", "$END"}), "the end of the statement"),
]

_NAMES: dict[str, str] = {
    "INT": "a number",
    "FLOAT": "a number",
    "PERCENT": "a percentage such as 10%",
    "FACTOR": "a multiple of the full cache's cost such as 1.5x",
    "NAME": "a name",
    "STRING": "a string in double quotes",
    "_SEP": "the end of the statement",
    "$END": "the end of the statement",
}
_PUNCTUATION = {
    "STAR": "*", "COLON": ":", "MINUS": "-", "COMMA": ",", "AT": "@", "LPAR": "(", "RPAR": ")",
    "LSQB": "[", "RSQB": "]", "EQUAL": "=", "LAYERS": "layers", "MODEL": "model",
    "BUDGET": "budget", "PREFILL": "prefill", "AT_MOST": "<=", "SOLVER": "solver", "TOTAL": "total",
    "HEADS": "heads", "ADAPTIVE": "adaptive", "DECODE": "decode", "AUTO": "auto", "TRUE": "true",
    "FALSE": "false",
}  # fmt: skip


def _expected_words(expected: set[str]) -> str:
    remaining = set(expected)
    if _GROUPS[0][0] <= remaining:  # at the start of a statement, its end is no news
        remaining -= {"_SEP", "$END"}
    phrases: list[str] = []
    for group, phrase in _GROUPS:
        if group <= remaining:
            phrases.append(phrase)
            remaining -= group
    for name in sorted(remaining, key=lambda n: (n not in _PUNCTUATION, n)):
        phrase = f"`{_PUNCTUATION[name]}`" if name in _PUNCTUATION else _NAMES.get(name, name)
        if phrase not in phrases:
            phrases.append(phrase)
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " or " + phrases[-1]


def _token_words(token: Token) -> str:
    if token.type == "$END":
        return "end of input"
    if token.type == "_SEP":
        return "`;`" if token.value == ";" else "end of line"
    if token.type in _PUNCTUATION:
        return f"`{token.value}`"
    kind = {
        "INT": "number", "FLOAT": "number", "NAME": "name", "STRING": "string", "PERCENT": "percentage",
        "FACTOR": "factor",
    }  # fmt: skip
    return (
        f"{kind.get(token.type, token.type.lower())} {token.value}" if token.type != "NAME" else f"name '{token.value}'"
    )


def _hint(found: str, expected: set[str]) -> str | None:
    if "COLON" in expected and found in {"NAME", "AUTO"}:
        return "put `:` between the layers and the policy, as in `layers 0-3: snapkv@256`"
    if {"INT", "PERCENT", "AUTO"} <= expected and found == "NAME":
        return "a budget is a token count (64), a percentage of the context (10%) or auto"
    if "NAME" in expected and "AUTO" in expected and found in {"INT", "PERCENT"}:
        return "name the policy before its budget, as in `snapkv@64`"
    if "DECODE" in expected and found == "NAME":
        return "to use another policy while decoding, write `decode` before it; separate statements with `;`"
    if found == "_SEP" and "RPAR" in expected:
        return "a statement fits on one line: close the parameters with `)` on the same line"
    if "FACTOR" in expected and found in {"INT", "FLOAT"}:
        return "a prefill limit is a multiple of the full cache's prefill, written with an x: `prefill <= 1.5x`"
    if "EQUAL" in expected:
        return "parameters are written name=value, as in `(window=32, kernel=7)`"
    return None


class _Invalid(Exception):
    """A token that fits the grammar but not the language (a keyword as a name, an infinite number)."""

    def __init__(self, message: str, token: Token, hint: str | None = None):
        super().__init__(message)
        self.token = token
        self.hint = hint


def _syntax_diagnostic(error: lark.UnexpectedInput, src: Source, working: str, start: int) -> tuple[Diagnostic, int]:
    """The diagnostic for ``error``, raised parsing ``working[start:]``, and the offset it is at in ``working``."""
    if isinstance(error, lark.UnexpectedCharacters):
        assert error.pos_in_stream is not None  # lark sets it for an unexpected character
        offset = start + error.pos_in_stream
        char = working[offset]
        expected = set(error.allowed or ())
        message = f"unexpected character {char!r}"
        if expected:
            message += f"; expected {_expected_words(expected)}"
        hint = "strings are written in double quotes" if char == "'" else None
        return Diagnostic("syntax", message, Span.at(src, offset, offset + 1), hint=hint), offset
    if isinstance(error, lark.UnexpectedToken):
        token = error.token
        # `accepts()` tries every terminal in the parser state; `expected` leaves out keywords.
        expected = set(error.interactive_parser.accepts()) if error.interactive_parser else set(error.expected)
        if token.type == "$END":
            offset = len(working)
            span = Span.at(src, offset, offset)
        else:
            offset = start + token.start_pos
            end = start + token.end_pos if token.type != "_SEP" or token.value == ";" else offset + 1
            span = Span.at(src, offset, max(end, offset + 1) if token.value != "\n" else offset + 1)
        message = f"unexpected {_token_words(token)}; expected {_expected_words(expected)}"
        return Diagnostic("syntax", message, span, hint=_hint(token.type, expected)), offset
    if isinstance(error, lark.UnexpectedEOF):
        offset = len(working)
        message = f"unexpected end of input; expected {_expected_words(set(error.expected))}"
        return Diagnostic("syntax", message, Span.at(src, offset, offset)), offset
    raise error


# --- parse tree to syntax tree ------------------------------------------------------------------


@v_args(meta=True, inline=True)
class _ToAst(Transformer):
    """Builds the attrs nodes; every node gets the span of the text it came from."""

    def __init__(self, source: Source):
        super().__init__()
        self._source = source

    def _span(self, meta) -> Span:
        return Span.at(self._source, meta.start_pos, meta.end_pos)

    def _token_span(self, token: Token) -> Span:
        assert token.start_pos is not None and token.end_pos is not None  # the parser's tokens have positions
        return Span.at(self._source, token.start_pos, token.end_pos)

    def start(self, meta, *statements):
        return list(statements)

    def model_layers(self, meta, count: Token, *heads: Token):
        return ast.ModelLayers(_whole(count), heads=_whole(heads[-1]) if heads else None, span=self._span(meta))

    def budget_decl(self, meta, *children):
        total = len(children) == 2
        return ast.BudgetDecl(children[-1], total=total, span=self._span(meta))

    def prefill_limit(self, meta, _at_most: Token, factor: Token):
        return ast.PrefillLimit(float(_decimal(factor, "factor")), span=self._span(meta))

    def solver_decl(self, meta, name: Token, *parameters):
        return ast.SolverDecl(
            str(name), parameters[0] if parameters else (), span=self._span(meta), name_span=self._token_span(name)
        )

    def tokens(self, meta, count: Token):
        return ast.Tokens(_whole(count), span=self._span(meta))

    def percent(self, meta, value: Token):
        return ast.Percent(_decimal(value, "percentage"), span=self._span(meta))

    def auto_budget(self, meta, _auto: Token):
        return ast.AutoBudget(span=self._span(meta))

    def rule(self, meta, selector, *rest):
        heads = rest[0] if isinstance(rest[0], ast.HeadList) else None
        prefill, *decode = rest[1:] if heads is not None else rest
        return ast.Rule(selector, prefill, decode[-1] if decode else None, heads=heads, span=self._span(meta))

    def head_list(self, meta, _heads: Token, *items):
        return ast.HeadList(items, span=self._span(meta))

    def every_head(self, meta, _heads: Token):
        return ast.HeadList((), every=True, span=self._span(meta))

    def adaptive_heads(self, meta, _heads: Token, _adaptive: Token):
        return ast.HeadList((), every=True, adaptive=True, span=self._span(meta))

    def every_layer(self, meta):
        return ast.EveryLayer(span=self._span(meta))

    def layer_list(self, meta, *items):
        return ast.LayerList(items, span=self._span(meta))

    def layer_index(self, meta, index: Token):
        return ast.LayerIndex(_whole(index), span=self._span(meta))

    def layer_range(self, meta, start: Token, stop: Token):
        return ast.LayerRange(_whole(start), _whole(stop), span=self._span(meta))

    def policy_use(self, meta, policy, *rest):
        name, candidates, name_span = policy
        budget = next((r for r in rest if not isinstance(r, list)), None)
        parameters = next((r for r in rest if isinstance(r, list)), [])
        return ast.PolicyUse(name, budget, parameters, candidates, span=self._span(meta), name_span=name_span)

    def named_policy(self, meta, name: Token):
        return (_policy_name(name), (), self._token_span(name))

    def auto_policy(self, meta, auto: Token, *candidates):
        return (ast.AUTO, tuple(candidates[0]) if candidates else (), self._token_span(auto))

    def candidates(self, meta, *names: Token):
        return [_policy_name(n) for n in names]

    def parameters(self, meta, *parameters):
        return list(parameters)

    def parameter(self, meta, name: Token, value):
        literal, value_span = value
        return ast.Parameter(str(name), literal, span=self._span(meta), value_span=value_span)

    def integer(self, meta, token: Token):
        return _whole(token), self._token_span(token)

    def real(self, meta, token: Token):
        return _finite(float(token), token, "number"), self._token_span(token)

    def string(self, meta, token: Token):
        return json.loads(token, strict=False), self._token_span(token)

    def true(self, meta, token: Token):
        return True, self._token_span(token)

    def false(self, meta, token: Token):
        return False, self._token_span(token)


def _whole(token: Token, text: str | None = None) -> int:
    """The integer ``token`` writes (``text``: the digits of it), refused before conversion past MAX_NUMBER_DIGITS."""
    text = str(token) if text is None else text
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise _Invalid(
            f"a whole number of {digits:,} digits is too long: a spec's whole numbers have at most "
            f"{MAX_NUMBER_DIGITS} digits",
            token,
            hint="write the count, index or value you mean; every one polykv takes has a few digits",
        )
    return int(text)


def _decimal(token: Token, what: str) -> int | float:
    """The number before a percentage's % or a factor's x: whole within MAX_NUMBER_DIGITS, or a finite decimal."""
    text = token.value[:-1]
    return _finite(float(text), token, what) if "." in text else _whole(token, text)


def _finite(value: int | float, token: Token, what: str) -> int | float:
    if not math.isfinite(value):
        shown = token if len(token) <= 20 else f"{token[:10]}...{token[-5:]}"
        raise _Invalid(f"the {what} {shown} is too large: past the largest number polykv computes with", token)
    return value


def _policy_name(token: Token) -> str:
    if token in ast.KEYWORDS:
        raise _Invalid(
            f"'{token}' is a keyword of the language, not a policy name",
            token,
            hint="keywords: " + ", ".join(sorted(ast.KEYWORDS)),
        )
    return str(token)


class _Builder:
    """Turns the parse tree into a Spec, placing comments and paragraph breaks between statements."""

    def __init__(self, source: Source, comments: list[Token]):
        self._source = source
        self._comments = comments

    def build(self, tree: lark.Tree) -> tuple[ast.Spec, list[Diagnostic]]:
        """The spec, and the diagnostics of statements that parse but hold an invalid token (left out)."""
        statements, invalid = self._statements(tree)
        statement_ends = {_span(s).end_line for s in statements}
        last_on_line = {_span(s).end_line: s for s in statements}
        trailing: dict[int, str] = {}
        positioned: list[tuple[int, int, ast.Item]] = []
        for token in self._comments:
            text = token.value[1:].replace("\r", "").rstrip()
            if token.line in statement_ends:
                trailing[id(last_on_line[token.line])] = text
            else:
                # The parser's tokens have positions.
                assert token.line is not None and token.start_pos is not None and token.end_pos is not None
                span = Span.at(self._source, token.start_pos, token.end_pos)
                positioned.append((token.line, token.line, ast.Comment(text, span=span)))
        for statement in statements:
            if id(statement) in trailing:
                statement = attrs.evolve(statement, comment=trailing[id(statement)])
            positioned.append((_span(statement).line, _span(statement).end_line, statement))
        positioned.sort(key=lambda entry: (entry[0], _span(entry[2]).start))
        items: list[ast.Item] = []
        previous_end = None
        for line, end_line, item in positioned:
            if previous_end is not None and line - previous_end > 1:
                items.append(ast.BlankLine())
            items.append(item)
            previous_end = end_line
        return ast.Spec(tuple(items), source_name=self._source.name, source_text=self._source.text), invalid

    def _statements(self, tree: lark.Tree) -> tuple[list[ast.Statement], list[Diagnostic]]:
        """Each statement built on its own, so that an invalid token costs its statement only."""
        transformer = _ToAst(self._source)
        statements, invalid = [], []
        for child in tree.children:
            try:
                statements.append(transformer.transform(child))
            except lark.exceptions.VisitError as error:
                if not isinstance(error.orig_exc, _Invalid):
                    raise error.orig_exc from None
                found = error.orig_exc
                assert found.token.start_pos is not None and found.token.end_pos is not None  # a parsed token
                span = Span.at(self._source, found.token.start_pos, found.token.end_pos)
                invalid.append(Diagnostic("syntax", str(found), span, hint=found.hint))
        return statements, invalid


def _span(node: ast.Item | Diagnostic) -> Span:
    """The span of a statement, comment or diagnostic the parser made: each has one."""
    assert node.span is not None
    return node.span
