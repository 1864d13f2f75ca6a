"""The built-in policies, signals and solvers of polykv.

They register through the ``polykv`` entry point like any third-party package, so
nothing in polykv itself knows their names.
"""

from polykv_plugins.cake import CakeSolver
from polykv_plugins.entropy import AttentionEntropy
from polykv_plugins.expected import ExpectedAttention
from polykv_plugins.full import Full
from polykv_plugins.h2o import H2O
from polykv_plugins.hidden_change import HiddenChange
from polykv_plugins.knapsack import KnapsackSolver
from polykv_plugins.knorm import KeyNorm
from polykv_plugins.kvzip import KVzip
from polykv_plugins.observed import ObservedAttention
from polykv_plugins.output_deviation import OutputDeviation
from polykv_plugins.pyramid import PyramidSolver
from polykv_plugins.pyramidkv import PyramidKV
from polykv_plugins.random import RandomEviction
from polykv_plugins.recency_mass import RecencyMass
from polykv_plugins.sink_mass import SinkMass
from polykv_plugins.snapkv import SnapKV
from polykv_plugins.streaming import Streaming
from polykv_plugins.tova import TOVA
from polykv_plugins.uniform import UniformSolver
from polykv_plugins.variance import AttentionVariance

from polykv.hooks import hookimpl

BUILTIN_POLICIES = (
    Full, Streaming, SnapKV, PyramidKV, H2O, TOVA, KeyNorm, RandomEviction, ObservedAttention, ExpectedAttention, KVzip,
)  # fmt: skip
BUILTIN_SIGNALS = (AttentionEntropy, AttentionVariance, SinkMass, RecencyMass, HiddenChange, OutputDeviation)
BUILTIN_SOLVERS = (KnapsackSolver, UniformSolver, PyramidSolver, CakeSolver)


@hookimpl
def register_policies(register):
    for policy in BUILTIN_POLICIES:
        register(policy)


@hookimpl
def register_signals(register):
    for signal in BUILTIN_SIGNALS:
        register(signal)


@hookimpl
def register_solvers(register):
    for solver in BUILTIN_SOLVERS:
        register(solver)
