"""pyramidkv: SnapKV scoring, meant for budgets that shrink with depth (PyramidKV, Cai et al. 2024, arXiv 2406.02069).

Within a layer PyramidKV scores like SnapKV; its contribution is the budget shape (lower layers
keep more). polykv's budget solver supplies that shape; with a fixed budget this policy is
SnapKV with the paper's experimental defaults: window 8, kernel 7, max pooling.
"""

from polykv_plugins.snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "SnapKV scoring with PyramidKV's window of 8; `solver pyramid` gives its depth-shaped budgets."
    window = 8
