"""Method names and default grids of the evaluation, free of heavy imports (the CLI's ``--help`` reads them).

The registry :data:`amortized_cartoonx.evaluation.methods.METHODS` is the authority; a test keeps these
lists equal to it.
"""

from __future__ import annotations

#: Evaluated when ``--methods`` is not given.
DEFAULT_METHODS = (
    "cartoonx",
    "pixel-rde",
    "integrated-gradients",
    "smoothgrad",
    "guided-backprop",
    "grad-cam",
    "random-pixel",
    "random-wavelet",
)
#: Need an amortized explainer checkpoint (added to the defaults when ``--checkpoint`` is given).
CHECKPOINT_METHODS = ("amortized", "warm")
ALL_METHODS = (*DEFAULT_METHODS[:2], *CHECKPOINT_METHODS, *DEFAULT_METHODS[2:])
#: Panel (c)'s default grids, spanning the paper's ranges (20..80 for CartoonX, 3..20 for Pixel RDE).
DEFAULT_LAMBDAS = {"cartoonx": (10.0, 20.0, 40.0, 80.0), "pixel-rde": (2.0, 4.0, 8.0, 16.0)}
