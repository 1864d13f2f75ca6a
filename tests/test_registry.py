"""The policy registry: built-ins through entry points, plugins in code, failures reported, parameters."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import re

import pytest
import torch
from fake_plugins import fake_distribution
from hypothesis import assume, given
from hypothesis import strategies as st

import polykv
from polykv.parameters import parameter
from polykv.registry import ENTRY_POINT_GROUP, Registry

BUILTINS = {
    "full",
    "streaming",
    "snapkv",
    "pyramidkv",
    "h2o",
    "tova",
    "knorm",
    "random",
    "observed",
    "expected",
    "kvzip",
}


@contextlib.contextmanager
def logs_skip(caplog, match: str = ""):
    """Expect the block to log one line per skipped plugin on the polykv.registry logger, one matching ``match``."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polykv.registry"):
        yield
    lines = [r.getMessage() for r in caplog.records if r.name == "polykv.registry"]
    assert lines, "no skipped plugin was logged"
    assert all(line.startswith("skipped plugin ") and "\n" not in line for line in lines), lines
    assert any(re.search(match, line) for line in lines), lines


def _third_party_distributions() -> set[str]:
    """Installed distributions other than polykv that declare polykv policies (normally none)."""
    return {
        ep.dist.name
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.name.lower() != "polykv-core"
    }


def _assert_builtins_only_from_polykv(registry: Registry) -> None:
    version = importlib.metadata.version("polykv-core")
    builtin = {entry.name for entry in registry.policies if entry.distribution == "polykv-core"}
    assert builtin == BUILTINS
    for entry in registry.policies:
        if entry.name in BUILTINS:
            assert (entry.distribution, entry.version, entry.plugin) == ("polykv-core", version, "polykv-core:builtin")
        else:  # only a third-party plugin installed next to polykv can add more
            assert entry.distribution in _third_party_distributions()
    if not _third_party_distributions():
        assert set(registry.policies.names()) == BUILTINS
        assert len(registry.policies) == len(BUILTINS)


# --- small policies and plugins made up for the tests ------------------------------------------


class Alpha(polykv.ScoringPolicy):
    name = "alpha"
    description = "A test policy."
    ratio: float = parameter(0.5, "a share", min=0.0, max=1.0)
    count: int = parameter(2, "a count", min=1)
    mode: str = parameter("a", "a mode", choices=("a", "b"))
    flag: bool = parameter(False, "a flag")

    def score(self, view):
        return view.positions.float()


class Beta(polykv.ScoringPolicy):
    name = "beta"
    description = "Another test policy."

    def score(self, view):
        return -view.positions.float()


class Upper(Beta):
    name = "Upper"


class Auto(Beta):
    name = "auto"


class Empty(Beta):
    name = ""


class Dashed(Beta):
    name = "has-dash"


class Nameless(polykv.ScoringPolicy):
    description = "No name at all."

    def score(self, view):
        return view.positions.float()


class Abstract(polykv.Policy):
    name = "abstract"
    description = "Forgets to implement select."


class Unscored(polykv.ScoringPolicy):
    name = "unscored"
    description = "Forgets to implement score."


class TwoLines(Beta):
    name = "two_lines"
    description = "First line.\nSecond line."


class BlankDescription(Beta):
    name = "blank"
    description = "   "


class ReservedParam(Beta):
    name = "reserved"
    budgeted: bool = parameter(True, "shadows a Policy attribute")


class Exploding(Beta):
    name = "exploding"

    def __init__(self, **values):
        super().__init__(**values)
        raise RuntimeError("cannot start")


class FractionalWindow(Beta):
    name = "fractional"

    def needs(self):
        return polykv.Needs(window=2.5, window_attention=True)


class StreamingAgain(Beta):
    name = "streaming"


class BetaAgain(Beta):
    name = "beta"
    description = "A second provider of beta."


class Offers:
    """A plugin object whose hook registers the given things, in order."""

    def __init__(self, *things):
        self.things = things

    @polykv.hookimpl
    def register_policies(self, register):
        for thing in self.things:
            register(thing)


class Raises:
    @polykv.hookimpl
    def register_policies(self, register):
        register(Beta)
        raise RuntimeError("boom")


# --- the default registry ------------------------------------------------------------------------


def test_default_registry_holds_the_builtins():
    registry = polykv.default_registry()
    assert registry is polykv.default_registry()  # loaded once
    assert registry.failures == ()
    _assert_builtins_only_from_polykv(registry)
    for name in BUILTINS:
        entry = registry.policies.get(name)
        assert entry.cls.name == name
        assert issubclass(entry.cls, polykv.Policy)
        assert polykv.registry.policy_problem(entry.cls) is None


def test_builtins_are_budgeted_except_full():
    registry = polykv.default_registry()
    assert {name for name in BUILTINS if not registry.policies.get(name).cls.budgeted} == {"full"}


def test_unknown_policy_is_a_key_error_listing_what_is_installed():
    with pytest.raises(KeyError, match=r"no policy named 'nope'; installed: .*snapkv"):
        polykv.default_registry().policies.get("nope")
    assert "nope" not in polykv.default_registry().policies
    assert "snapkv" in polykv.default_registry().policies


# --- plugins added in code -------------------------------------------------------------------------


def test_plugin_added_in_code_adds_and_removes_its_policies():
    registry = Registry()
    assert len(registry.policies) == 0
    registry.add_plugin(Offers(Alpha), name="first")
    registry.add_plugin(Offers(Beta), name="mine", distribution="polykv-mine", version="1.2")
    try:
        assert registry.policies.names() == ["alpha", "beta"]
        entry = registry.policies.get("beta")
        assert (entry.cls, entry.distribution, entry.version, entry.plugin) == (Beta, "polykv-mine", "1.2", "mine")
        assert registry.policies.get("alpha").distribution == "<local>"
        assert isinstance(registry.policies.create("beta"), Beta)
        assert [e.name for e in registry.policies] == ["alpha", "beta"]
    finally:
        registry.remove_plugin("mine")
    assert registry.policies.names() == ["alpha"]
    assert "beta" not in registry.policies
    with pytest.raises(KeyError):
        registry.policies.get("beta")
    with pytest.raises(KeyError, match="no plugin named 'mine'"):
        registry.remove_plugin("mine")
    # Once removed, the same name can be added again.
    registry.add_plugin(Offers(Beta), name="mine")
    assert registry.policies.names() == ["alpha", "beta"]
    assert registry.failures == ()


def test_plugin_added_next_to_the_builtins(monkeypatch):
    monkeypatch.delenv("POLYKV_PLUGINS", raising=False)
    registry = Registry.from_environment()
    registry.add_plugin(Offers(Beta), name="extra")
    try:
        assert set(registry.policies.names()) >= BUILTINS | {"beta"}
    finally:
        registry.remove_plugin("extra")
    _assert_builtins_only_from_polykv(registry)


# --- failures: skipped and reported, the rest loads --------------------------------------------------

LABEL = "policy class {}: name must be lower-case letters, digits and _ (not a keyword), got {!r}"

BAD_POLICIES = [
    pytest.param(42, "register() takes a Policy subclass, got 42", id="not-a-class"),
    pytest.param(dict, "register() takes a Policy subclass, got <class 'dict'>", id="not-a-policy"),
    pytest.param(Upper, LABEL.format("Upper", "Upper"), id="uppercase-name"),
    pytest.param(Auto, LABEL.format("Auto", "auto"), id="keyword-name"),
    pytest.param(Empty, LABEL.format("Empty", ""), id="empty-name"),
    pytest.param(Dashed, LABEL.format("Dashed", "has-dash"), id="dashed-name"),
    pytest.param(Nameless, LABEL.format("Nameless", None), id="no-name"),
    pytest.param(Abstract, "policy 'abstract' does not implement select", id="abstract-select"),
    pytest.param(Unscored, "policy 'unscored' does not implement score", id="abstract-score"),
    pytest.param(TwoLines, "policy 'two_lines': description must be one non-empty line", id="newline-description"),
    pytest.param(BlankDescription, "policy 'blank': description must be one non-empty line", id="blank-description"),
    pytest.param(ReservedParam, "policy 'reserved': parameter 'budgeted' is not allowed", id="reserved-param-name"),
    pytest.param(
        Exploding,
        "policy 'exploding' cannot be created with its defaults: RuntimeError: cannot start",
        id="init-raises",
    ),
    pytest.param(
        FractionalWindow,
        "policy 'fractional': needs() or min_budget() raised TypeError: a query window is a whole number of "
        "queries, got 2.5",
        id="fractional-window",
    ),
]


def _declare(body: str) -> type:
    namespace: dict = {"Beta": Beta, "parameter": parameter}
    exec(f"class Declared(Beta):\n    name = 'declared'\n{body}", namespace)
    return namespace["Declared"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "    window: int = parameter(0, 'w', min=1)",
            "Declared: the default of parameter 'window' must be at least 1",
        ),
        (
            "    pooling: str = parameter('min', 'p', choices=('max', 'avg'))",
            """Declared: the default of parameter 'pooling' is one of "max", "avg", got "min\"""",
        ),
        (
            "    mode: str = parameter('a', 'm', min=1)",
            "Declared.mode: min and max bound numbers, and mode is a str (give a str parameter choices)",
        ),
        (
            "    flag: bool = parameter(False, 'f', max=1)",
            "Declared.flag: min and max bound numbers, and flag is a bool",
        ),
        ("    window = parameter(4, 'w')", "Declared.window: annotate a parameter with int, float, bool or str"),
        ("    window: list = parameter(4, 'w')", "Declared.window: annotate a parameter with int, float, bool or str"),
        (
            "    parameters = ()",
            "Declared: declare each parameter as `name: type = parameter(default=..., description=...)`",
        ),
    ],
)
def test_a_malformed_parameter_declaration_fails_where_the_class_is_made(body, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _declare(body)


def test_a_subclass_changes_a_default_and_keeps_the_rest():
    class Narrow(Alpha):
        name = "narrow"
        count = 5

    assert [p.name for p in Narrow.parameters] == ["ratio", "count", "mode", "flag"]
    count = Narrow.parameters[1]
    assert (count.default, count.min, count.description) == (5, 1, "a count")
    assert Narrow().count == 5 and Alpha().count == 2
    with pytest.raises(TypeError, match="the default of parameter 'count' must be at least 1, got 0"):

        class Zero(Alpha):
            count = 0


def test_policies_are_immutable_and_compare_by_value():
    assert Alpha(count=3) == Alpha(count=3) and Alpha(count=3) != Alpha(count=4)
    assert hash(Alpha(count=3)) == hash(Alpha(count=3))
    with pytest.raises(AttributeError, match="alpha is immutable"):
        Alpha().count = 9


@pytest.mark.parametrize(("bad", "reason"), BAD_POLICIES)
def test_malformed_policy_is_skipped_and_reported(bad, reason, caplog):
    registry = Registry()
    registry.add_plugin(Offers(Alpha), name="good")
    with logs_skip(caplog, re.escape(f"skipped plugin polykv-bad: {reason}")):
        registry.add_plugin(Offers(Beta, bad), name="bad", distribution="polykv-bad", version="0.3")
    assert registry.failures == (polykv.PluginFailure("polykv-bad", "bad", reason),)
    assert str(registry.failures[0]) == f"polykv-bad: {reason}"
    # The good policy of the same plugin, and the other plugin, still load.
    assert registry.policies.names() == ["alpha", "beta"]
    assert registry.policies.get("beta").plugin == "bad"


def test_hook_that_raises_skips_the_whole_plugin(caplog):
    registry = Registry()
    registry.add_plugin(Offers(Alpha), name="good")
    with logs_skip(caplog, "^skipped plugin polykv-raise: register_policies raised RuntimeError: boom$"):
        registry.add_plugin(Raises(), name="raiser", distribution="polykv-raise")
    assert registry.failures == (
        polykv.PluginFailure("polykv-raise", "raiser", "register_policies raised RuntimeError: boom"),
    )
    assert registry.policies.names() == ["alpha"]  # what it registered before raising is dropped too
    # The plugin is not left registered: a later plugin's hook call does not run it again.
    registry.add_plugin(Offers(Beta), name="later")
    assert registry.policies.names() == ["alpha", "beta"]
    assert len(registry.failures) == 1
    with pytest.raises(KeyError):
        registry.remove_plugin("raiser")


def test_invalid_hook_signature_is_reported(caplog):
    class WrongArgument:
        @polykv.hookimpl
        def register_policies(self, reg):
            reg(Beta)

    registry = Registry()
    with logs_skip(caplog, "not a valid plugin"):
        registry.add_plugin(WrongArgument(), name="wrong", distribution="polykv-wrong")
    [failure] = registry.failures
    assert (failure.distribution, failure.plugin) == ("polykv-wrong", "wrong")
    assert failure.reason.startswith("not a valid plugin: PluginValidationError")
    assert len(registry.policies) == 0


def test_plugin_that_registers_nothing_is_reported(caplog):
    class Misspelt:
        @polykv.hookimpl
        def register_policies(self, register):
            pass

    class Unmarked:
        def register_policies(self, register):  # no @polykv.hookimpl: never called
            register(Beta)

    registry = Registry()
    for plugin, name in ((Misspelt(), "empty"), (Unmarked(), "unmarked")):
        with logs_skip(caplog, "registered no policies"):
            registry.add_plugin(plugin, name=name, distribution="polykv-empty")
    reason = (
        "registered no policies, signals or solvers (are its hooks spelt register_policies, ... and marked @hookimpl?)"
    )
    assert registry.failures == (
        polykv.PluginFailure("polykv-empty", "empty", reason),
        polykv.PluginFailure("polykv-empty", "unmarked", reason),
    )
    assert len(registry.policies) == 0
    with pytest.raises(KeyError):  # not left registered
        registry.remove_plugin("empty")
    registry.add_plugin(Offers(Beta), name="empty")
    assert registry.policies.names() == ["beta"]


def test_duplicate_name_first_provider_wins(caplog):
    registry = Registry()
    registry.add_plugin(Offers(Beta), name="one", distribution="dist-one", version="1.0")
    with logs_skip(caplog, "^skipped plugin dist-two: policy 'beta' is already provided by dist-one 1.0$"):
        registry.add_plugin(Offers(BetaAgain, Alpha), name="two", distribution="dist-two", version="2.0")
    assert registry.failures == (
        polykv.PluginFailure("dist-two", "two", "policy 'beta' is already provided by dist-one 1.0"),
    )
    assert registry.policies.get("beta").cls is Beta
    assert registry.policies.get("beta").distribution == "dist-one"
    assert registry.policies.names() == ["alpha", "beta"]


def test_duplicate_name_without_a_version_names_the_distribution_alone(caplog):
    registry = Registry()
    registry.add_plugin(Offers(Beta), name="one")
    with logs_skip(caplog):
        registry.add_plugin(Offers(BetaAgain), name="two", distribution="dist-two")
    assert registry.failures[0].reason == "policy 'beta' is already provided by <local>"


def test_plugin_cannot_replace_a_builtin(monkeypatch, caplog):
    monkeypatch.setenv("POLYKV_PLUGINS", "polykv-core")
    registry = Registry.from_environment()
    version = importlib.metadata.version("polykv-core")
    with logs_skip(caplog, f"policy 'streaming' is already provided by polykv-core {re.escape(version)}"):
        registry.add_plugin(Offers(StreamingAgain, Beta), name="usurper", distribution="polykv-usurper")
    [failure] = registry.failures
    assert failure == polykv.PluginFailure(
        "polykv-usurper", "usurper", f"policy 'streaming' is already provided by polykv-core {version}"
    )
    assert registry.policies.get("streaming").cls is not StreamingAgain
    assert registry.policies.get("streaming").distribution == "polykv-core"
    assert "beta" in registry.policies


# --- POLYKV_PLUGINS ---------------------------------------------------------------------------------------


def test_environment_unset_loads_every_plugin(monkeypatch, caplog):
    monkeypatch.delenv("POLYKV_PLUGINS", raising=False)
    with caplog.at_level(logging.WARNING, logger="polykv"):
        registry = Registry.from_environment()
    assert registry.failures == ()
    _assert_builtins_only_from_polykv(registry)
    assert not caplog.records


@pytest.mark.parametrize("setting", ["none", "NONE", " None "])
def test_environment_none_loads_only_the_builtins(monkeypatch, setting):
    monkeypatch.setenv("POLYKV_PLUGINS", setting)
    registry = Registry.from_environment()
    assert set(registry.policies.names()) == BUILTINS
    assert {e.distribution for e in registry.policies} == {"polykv-core"}
    assert registry.failures == ()


@pytest.mark.parametrize(
    "setting",
    ["polykv-core", "Polykv-Core", "POLYKV_CORE", " polykv.core ", "polykv-core,", "polykv-core, polykv_core"],
)
def test_environment_naming_polykv_core_loads_the_builtins(monkeypatch, setting):
    monkeypatch.setenv("POLYKV_PLUGINS", setting)
    registry = Registry.from_environment()
    assert set(registry.policies.names()) == BUILTINS
    assert registry.failures == ()


def test_environment_naming_a_missing_distribution_reports_it(monkeypatch, caplog):
    monkeypatch.setenv("POLYKV_PLUGINS", "polykv-core,not-installed-pkg")
    with logs_skip(caplog, "not-installed-pkg"):
        registry = Registry.from_environment()
    assert set(registry.policies.names()) == BUILTINS
    assert registry.failures == (
        polykv.PluginFailure(
            "not-installed-pkg",
            "POLYKV_PLUGINS",
            "POLYKV_PLUGINS names 'not-installed-pkg', which provides no polykv plugins (is it installed?)",
        ),
    )


def test_environment_names_are_normalised(monkeypatch, caplog):
    monkeypatch.setenv("POLYKV_PLUGINS", "Not_Installed.Pkg")
    with logs_skip(caplog):
        registry = Registry.from_environment()
    assert set(registry.policies.names()) == BUILTINS
    [failure] = registry.failures
    assert failure.distribution == "not-installed-pkg"


# --- creating policies ----------------------------------------------------------------------------------


def test_create_coerces_values():
    registry = polykv.default_registry()
    h2o = registry.policies.create("h2o", {"recent": 1})
    assert h2o.recent == 1.0
    assert type(h2o.recent) is float
    assert type(h2o.values["recent"]) is float
    snap = registry.policies.create("snapkv", {"window": 4, "pooling": "avg"})
    assert (snap.window, snap.kernel, snap.pooling) == (4, 7, "avg")
    assert dict(snap.values) == {"window": 4, "kernel": 7, "pooling": "avg"}
    assert repr(snap) == 'snapkv(window=4, kernel=7, pooling="avg")'
    assert registry.policies.create("snapkv").values == {"window": 32, "kernel": 7, "pooling": "max"}
    assert registry.policies.create("snapkv", None).window == 32
    assert repr(registry.policies.create("knorm")) == "knorm"


def test_policy_values_are_read_only():
    snap = polykv.default_registry().policies.create("snapkv")
    with pytest.raises(TypeError):
        snap.values["window"] = 3


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("snapkv", {"windw": 4}, "snapkv has no parameter 'windw'"),
        ("snapkv", {"window": 4.0}, "parameter 'window' takes a whole number, got a number (4.0)"),
        ("snapkv", {"window": True}, "parameter 'window' takes a whole number, got a boolean (true)"),
        ("snapkv", {"window": 0}, "parameter 'window' must be between 1 and 1024, got 0"),
        ("snapkv", {"pooling": "min"}, 'parameter \'pooling\' is one of "max", "avg", got "min"'),
        ("h2o", {"recent": "half"}, "parameter 'recent' takes a number, got a string (\"half\")"),
        ("h2o", {"recent": 1.5}, "parameter 'recent' must be between 0 and 1, got 1.5"),
        ("tova", {"per_head": 1}, "parameter 'per_head' takes true or false, got a whole number (1)"),
        ("knorm", {"anything": 1}, "knorm has no parameter 'anything'"),
    ],
)
def test_create_rejects_bad_values(name, values, message):
    with pytest.raises(polykv.ParameterError) as raised:
        polykv.default_registry().policies.create(name, values)
    assert str(raised.value) == message


# --- Param.coerce ---------------------------------------------------------------------------------------

INT = polykv.Param("n", int, 3, "a count", min=1, max=10)
FLOAT = polykv.Param("x", float, 0.5, "a share", min=0.0, max=1.0)
BOOL = polykv.Param("b", bool, False, "a flag")
STR = polykv.Param("s", str, "max", "a mode", choices=("max", "avg"))
FREE_STR = polykv.Param("label", str, "", "anything")


@pytest.mark.parametrize(
    ("param", "value", "expected"),
    [
        (INT, 1, 1),
        (INT, 10, 10),
        (FLOAT, 0, 0.0),
        (FLOAT, 1, 1.0),
        (FLOAT, 0.25, 0.25),
        (BOOL, True, True),
        (BOOL, False, False),
        (STR, "avg", "avg"),
        (FREE_STR, "any thing", "any thing"),
    ],
)
def test_coerce_accepts(param, value, expected):
    result = param.coerce(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("param", "value", "message", "hint"),
    [
        (INT, 2.0, "parameter 'n' takes a whole number, got a number (2.0)", "for example n=3"),
        (INT, True, "parameter 'n' takes a whole number, got a boolean (true)", "for example n=3"),
        (INT, "2", "parameter 'n' takes a whole number, got a string (\"2\")", "for example n=3"),
        (INT, 0, "parameter 'n' must be between 1 and 10, got 0", None),
        (INT, 11, "parameter 'n' must be between 1 and 10, got 11", None),
        (FLOAT, False, "parameter 'x' takes a number, got a boolean (false)", "for example x=0.5"),
        (FLOAT, "0.5", "parameter 'x' takes a number, got a string (\"0.5\")", "for example x=0.5"),
        (FLOAT, -0.5, "parameter 'x' must be between 0 and 1, got -0.5", None),
        (FLOAT, 2, "parameter 'x' must be between 0 and 1, got 2.0", None),
        (FLOAT, math.inf, "parameter 'x' takes a finite number, got inf", None),
        (BOOL, 1, "parameter 'b' takes true or false, got a whole number (1)", "for example b=false"),
        (BOOL, 0, "parameter 'b' takes true or false, got a whole number (0)", "for example b=false"),
        (BOOL, "true", "parameter 'b' takes true or false, got a string (\"true\")", "for example b=false"),
        (STR, "min", 'parameter \'s\' is one of "max", "avg", got "min"', 's="max"'),
        (STR, "MAX", 'parameter \'s\' is one of "max", "avg", got "MAX"', 's="max"'),
        (STR, 1, "parameter 's' takes a string, got a whole number (1)", 's="max"'),
        (FREE_STR, 1.5, "parameter 'label' takes a string, got a number (1.5)", 'label=""'),
    ],
)
def test_coerce_rejects(param, value, message, hint):
    with pytest.raises(polykv.ParameterError) as raised:
        param.coerce(value)
    assert str(raised.value) == message
    if hint is None:
        assert raised.value.hint is None
    else:
        assert raised.value.hint.endswith(hint)


@pytest.mark.parametrize(
    ("param", "words"),
    [
        (polykv.Param("a", int, 1, "d", min=1), "at least 1"),
        (polykv.Param("a", int, 1, "d", max=4), "at most 4"),
        (polykv.Param("a", float, 0.5, "d", min=0.25, max=1), "between 0.25 and 1"),
        (polykv.Param("a", int, 1, "d"), "any value"),
    ],
)
def test_range_words(param, words):
    assert param.range_words() == words


def test_param_type_must_be_known():
    with pytest.raises(TypeError, match="type must be int, float, bool or str"):
        polykv.Param("a", list, [], "d")


@given(lo=st.integers(-50, 50), span=st.integers(0, 50), value=st.integers(-200, 200))
def test_int_coerce_accepts_exactly_the_values_in_range(lo, span, value):
    hi = lo + span
    param = polykv.Param("n", int, lo, "a count", min=lo, max=hi)
    if lo <= value <= hi:
        assert param.coerce(value) == value
        assert type(param.coerce(value)) is int
    else:
        with pytest.raises(polykv.ParameterError) as raised:
            param.coerce(value)
        assert str(raised.value) == f"parameter 'n' must be between {lo} and {hi}, got {value}"


@given(lo=st.integers(-50, 50), value=st.integers(-200, 200))
def test_int_coerce_with_only_a_minimum(lo, value):
    param = polykv.Param("n", int, lo, "a count", min=lo)
    if value >= lo:
        assert param.coerce(value) == value
    else:
        with pytest.raises(polykv.ParameterError, match=f"must be at least {lo}, got {value}$"):
            param.coerce(value)


@given(value=st.integers(-(10**6), 10**6))
def test_float_param_takes_any_int_as_float(value):
    param = polykv.Param("x", float, 0.0, "a number")
    result = param.coerce(value)
    assert type(result) is float
    assert result == value


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_float_coerce_accepts_exactly_the_values_in_range(value):
    if 0.0 <= value <= 1.0:
        assert FLOAT.coerce(value) == value
    else:
        with pytest.raises(polykv.ParameterError, match="must be between 0 and 1"):
            FLOAT.coerce(value)


@given(value=st.text(max_size=5))
def test_choices_accept_exactly_the_choices(value):
    assume(value not in ("max", "avg"))
    with pytest.raises(polykv.ParameterError, match="is one of"):
        STR.coerce(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_float_parameters_reject_values_that_are_not_finite(value):
    with pytest.raises(polykv.ParameterError, match="parameter 'x' takes a finite number, got"):
        FLOAT.coerce(value)


@pytest.mark.parametrize("value", [None, [1], torch.tensor(1)])
def test_coerce_rejects_other_types_with_parameter_error(value):
    with pytest.raises(polykv.ParameterError, match="parameter 'n' takes a whole number"):
        INT.coerce(value)


def test_a_skipped_entry_point_is_named_where_its_distribution_declares_several(tmp_path, monkeypatch, caplog):
    """polykv-two declares two entry points, which fail for two reasons: each line says which. A distribution of
    one entry point is named alone, as its entry point adds nothing."""
    fake_distribution(
        tmp_path / "two",
        "polykv-two",
        {"polykv_two_fine": "", "polykv_two_broken": "import polykv_two_missing_dependency\n"},
        {"fine": "polykv_two_fine", "broken": "polykv_two_broken"},
    )
    fake_distribution(
        tmp_path / "one", "polykv-one", {"polykv_one": "import polykv_one_missing\n"}, {"one": "polykv_one"}
    )
    for folder in ("two", "one"):
        monkeypatch.syspath_prepend(str(tmp_path / folder))
    registry = Registry()
    with caplog.at_level(logging.WARNING, logger="polykv.registry"):
        registry.load_entry_points(only={"polykv-two", "polykv-one"})
    lines = {str(failure) for failure in registry.failures}
    assert (
        "polykv-two (entry point 'broken'): import failed: ModuleNotFoundError: No module named "
        "'polykv_two_missing_dependency'" in lines
    )
    assert "polykv-one: import failed: ModuleNotFoundError: No module named 'polykv_one_missing'" in lines
    assert any(line.startswith("polykv-two (entry point 'fine'): registered no policies") for line in lines), lines
