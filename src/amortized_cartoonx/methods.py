"""The method table: every explanation method the project knows, in one place.

The CLI (``explain --method``, ``evaluate --methods``), the evaluation, the plots, the report and the demo all
read this table; ``tests/test_methods.py`` ties every other list of names (the evaluation's registry of
factories, the CLI choices) to it. Plain data only: ``cartoonx --help`` reads it without importing torch.

Columns:
    name: the id used on the command line and in result files.
    title: the human-readable name in figures and reports.
    representation: ``"wavelet"`` (a mask on DWT coefficients) or ``"pixel"`` (a pixel map).
    kind: ``"exact"`` (the per-image RDE optimizer), ``"amortized"`` (needs a trained mask-predictor checkpoint),
        ``"baseline"`` (a gradient or saliency method, via captum) or ``"reference"`` (a random ordering).
    colour: the line colour in rate-distortion figures (matplotlib colour spec).
"""

from __future__ import annotations

from dataclasses import dataclass

WAVELET = "wavelet"
PIXEL = "pixel"
EXACT = "exact"
AMORTIZED = "amortized"
BASELINE = "baseline"
REFERENCE = "reference"


@dataclass(frozen=True)
class MethodInfo:
    """One row of :data:`METHOD_TABLE` (see the module docstring for the columns)."""

    name: str
    title: str
    representation: str
    kind: str
    colour: str

    @property
    def explains(self) -> bool:
        """Whether ``cartoonx explain`` offers it (the RDE explainers: exact and amortized)."""
        return self.kind in (EXACT, AMORTIZED)

    @property
    def needs_checkpoint(self) -> bool:
        return self.kind == AMORTIZED


#: In display order (figures, tables, reports).
METHOD_TABLE: tuple[MethodInfo, ...] = (
    MethodInfo("cartoonx", "CartoonX", WAVELET, EXACT, "tab:blue"),
    MethodInfo("pixel-rde", "Pixel RDE", PIXEL, EXACT, "tab:red"),
    MethodInfo("amortized", "Amortized CartoonX", WAVELET, AMORTIZED, "tab:cyan"),
    MethodInfo("warm", "Warm-started CartoonX", WAVELET, AMORTIZED, "tab:purple"),
    MethodInfo("integrated-gradients", "Integrated Gradients", PIXEL, BASELINE, "tab:green"),
    MethodInfo("smoothgrad", "SmoothGrad", PIXEL, BASELINE, "tab:olive"),
    MethodInfo("guided-backprop", "Guided Backprop", PIXEL, BASELINE, "tab:brown"),
    MethodInfo("grad-cam", "Grad-CAM", PIXEL, BASELINE, "tab:orange"),
    MethodInfo("random-pixel", "Random (pixels)", PIXEL, REFERENCE, "0.55"),
    MethodInfo("random-wavelet", "Random (wavelets)", WAVELET, REFERENCE, "0.2"),
)

_BY_NAME = {m.name: m for m in METHOD_TABLE}

#: Every method name, in display order.
ALL_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE)
#: What ``cartoonx explain --method`` offers.
EXPLAIN_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE if m.explains)
#: The exact RDE optimizers.
EXACT_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE if m.kind == EXACT)
#: Need an amortized explainer checkpoint.
CHECKPOINT_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE if m.needs_checkpoint)
#: Evaluated when ``--methods`` is not given (everything that needs no checkpoint).
DEFAULT_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE if not m.needs_checkpoint)


def method_info(name: str) -> MethodInfo:
    """The row of ``name``; unknown names raise a ``KeyError`` listing the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}") from None


def title(name: str) -> str:
    """The display title of ``name`` (the name itself for a method outside the table)."""
    info = _BY_NAME.get(name)
    return info.title if info is not None else name
