"""The harness policy authors reuse: builders, hypothesis strategies, and the policy contract.

    from polykv.testing import PolicyContract

    class TestMyPolicy(PolicyContract):
        policy = MyPolicy

runs polykv's contract on ``MyPolicy`` (see ``PolicyContract``). The pytest plugin that ships with
polykv registers the ``gpu`` and ``slow`` markers and the hypothesis profiles ``polykv-ci`` and
``polykv-thorough`` (``HYPOTHESIS_PROFILE=polykv-thorough pytest`` runs many more examples).
"""

from polykv.testing.contract import PolicyContract
from polykv.testing.models import FAMILIES, WordTokenizer, prompt, prompt_lengths, tiny_model
from polykv.testing.views import random_view

__all__ = ["FAMILIES", "PolicyContract", "WordTokenizer", "prompt", "prompt_lengths", "random_view", "tiny_model"]
