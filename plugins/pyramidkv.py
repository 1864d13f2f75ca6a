"""pyramidkv: SnapKV scoring, meant for budgets that shrink with depth (PyramidKV, Cai et al. 2024, arXiv 2406.02069).

Within a layer PyramidKV scores like SnapKV; its contribution is the budget shape (lower layers
keep more). polykv's budget solver supplies that shape; with a fixed budget this policy is
SnapKV with the paper's experimental defaults: window 8, kernel 7, max pooling.
"""

from polykv_plugins.snapkv import SnapKV

from polykv.policy import Param


class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "SnapKV scoring with PyramidKV's defaults; its depth-shaped budgets come from the solver."
    parameters = (
        Param("window", int, 8, "observation window: the last queries whose attention scores tokens", min=1),
        Param("kernel", int, 7, "pooling width along the sequence (1: no pooling)", min=1),
        Param("pooling", str, "max", "how scores are pooled", choices=("max", "avg")),
    )
