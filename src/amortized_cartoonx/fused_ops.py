"""Autograd functions that do in one pass over memory what plain torch ops do in several.

The optimizer step's own cost on a CPU is mostly memory traffic over the ``(N * L, C, ...)`` tensors of the
obfuscations (about 13 MB each at B x L = 16, 256 px). Each function here computes exactly what its docstring's
plain torch expression computes (values up to the order of floating-point operations, the same gradient) with
fewer passes; the tests compare them with those expressions. ``scripts/profile_step.py`` shows the costs.

The mixing functions take the fused form on a CPU (where it was measured) when only the mask needs a gradient, and
the plain expression otherwise (:func:`_fused`), so their callers have one code path for every device.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _UnitClamp(torch.autograd.Function):
    """``x.clamp(0, 1)`` with the same gradient as autograd's (passed where ``0 < x < 1``) in one pass.

    Autograd's backward of ``clamp`` makes four passes over the tensor (two comparisons, an and, a where):
    8 ms of a 190 ms CPU step at B x L = 16, 256 px; ``hardtanh_backward`` makes one.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, 0.0, 1.0)


def clamp_unit(x: Tensor) -> Tensor:
    """``x.clamp(0, 1)``, the same values and gradient, with a cheaper backward (:class:`_UnitClamp`)."""
    return _UnitClamp.apply(x) if x.requires_grad and x.is_floating_point() else x.clamp(0.0, 1.0)


class _Mix(torch.autograd.Function):
    """``s * h + (1 - s) * v`` for a mask ``s``, coefficients ``h`` and noise samples ``v``; gradient for ``s`` only.

    Shapes: ``s (N, 1 or C, ...)``, ``h (N, C, ...)``, ``v (N, L, C, ...)`` (any strides) -> ``(N, L, C, ...)``.

    Forward: ``s * h`` and ``1 - s`` are per image (L times smaller), so the L-sized output is one ``addcmul``
    pass instead of autograd's three (``h - v``, the product, the sum) and no L-sized tensor is saved: the backward
    reads ``v``, which the caller holds anyway. Backward: ``sum_l g_l * (h - v_l) = h * sum_l g_l - sum_l g_l v_l``.
    """

    @staticmethod
    def forward(ctx, s: Tensor, h: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(s, h, v)
        return torch.addcmul((s * h).unsqueeze(1), (1 - s).unsqueeze(1), v)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        s, h, v = ctx.saved_tensors
        return _mask_gradient(grad, s, h, v), None, None


def _fused(h: Tensor, v: Tensor) -> bool:
    """Whether the mixing takes its fused form: on a CPU, with gradients for the mask only."""
    return v.device.type == "cpu" and not (h.requires_grad or v.requires_grad)


def _plain_mix(s: Tensor, h: Tensor, v: Tensor) -> Tensor:
    """``s * h + (1 - s) * v`` with autograd's ops: ``(N, L, C, ...)``."""
    return v + s.unsqueeze(1) * (h.unsqueeze(1) - v)


def mix(s: Tensor, h: Tensor, v: Tensor) -> Tensor:
    """``s * h + (1 - s) * v`` broadcast to ``(N, L, C, ...)`` (see :class:`_Mix`): ``s (N, 1 or C, ...)``,
    ``h (N, C, ...)``, ``v (N, L, C, ...)``. The fused form where :func:`_fused`, else the plain expression."""
    return _Mix.apply(s, h, v) if _fused(h, v) else _plain_mix(s, h, v)


def _mask_gradient(grad: Tensor, s: Tensor, h: Tensor, v: Tensor) -> Tensor:
    """The gradient of ``s`` from ``grad`` of ``s * h + (1 - s) * v`` (``(N, L, C, ...)``, any strides)."""
    per_channel = h * grad.sum(1) - (grad * v).sum(1)  # (N, C, ...): sum_l g_l * (h - v_l)
    if s.shape[1] != per_channel.shape[1]:  # a mask shared by the channels
        per_channel = per_channel.sum(1, keepdim=True)
    return per_channel


class _MixIntoBands(torch.autograd.Function):
    """One synthesis level's input: ``x`` beside the mixed detail bands ``s * h + (1 - s) * v``, written straight
    into one ``(N * L * C, 4, H, W)`` buffer (what ``torch.cat`` of ``x`` and :func:`mix`'s output would copy
    together). Gradients for ``x`` and ``s``.

    Shapes: ``x (N * L, C, H, W)`` (rows image-major), ``s (N, 1 or C, 3, H, W)``, ``h (N, C, 3, H, W)``,
    ``v (N, L, C, 3, H, W)`` (any strides).
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, h: Tensor, v: Tensor) -> Tensor:
        n, samples, channels, _, height, width = v.shape
        ctx.save_for_backward(s, h, v)
        bands = x.new_empty(n, samples, channels, 4, height, width)
        bands[:, :, :, 0] = x.unflatten(0, (n, samples))  # a view also of a cropped x
        torch.addcmul((s * h).unsqueeze(1), (1 - s).unsqueeze(1), v, out=bands[:, :, :, 1:])
        return bands.view(n * samples * channels, 4, height, width)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        s, h, v = ctx.saved_tensors
        n, samples, channels, _, height, width = v.shape
        by_band = grad.view(n, samples, channels, 4, height, width)
        grad_x = by_band[:, :, :, 0].reshape(n * samples, channels, height, width) if ctx.needs_input_grad[0] else None
        grad_s = _mask_gradient(by_band[:, :, :, 1:], s, h, v) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


def mix_into_bands(x: Tensor, s: Tensor, h: Tensor, v: Tensor) -> Tensor:
    """``(N * L * C, 4, H, W)``: the level's low-pass ``x`` and the mixed details ``s * h + (1 - s) * v`` side by
    side, as :class:`_MixIntoBands` where :func:`_fused`, else with ``torch.cat``."""
    if _fused(h, v):
        return _MixIntoBands.apply(x, s, h, v)
    n, samples, channels, _, height, width = v.shape
    bands = torch.cat([x.unflatten(0, (n, samples)).unsqueeze(3), _plain_mix(s, h, v)], dim=3)  # (N, L, C, 4, H, W)
    return bands.reshape(n * samples * channels, 4, height, width)


class _InterleaveUnitClamp(torch.autograd.Function):
    """``interleave_phases(z).clamp(0, 1)``: ``(M, 4, H, W) -> (M, 1, 2H, 2W)`` in one pass each way.

    Output pixel ``(2i + r, 2j + s)`` is ``z[:, 2r + s, i, j]`` clamped to [0, 1]; the gradient passes where
    ``0 < z < 1``, as autograd's clamp passes it. The clamp writes straight into the interleaved layout and the
    backward's mask-and-de-interleave is one ``hardtanh_backward`` into the phase layout, where the plain ops make
    a copy and a clamp pass each way.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        m, _, height, width = z.shape
        ctx.save_for_backward(z)
        out = z.new_empty(m, 1, 2 * height, 2 * width)
        phases = z.view(m, 2, 2, height, width).permute(0, 3, 1, 4, 2)  # (M, H, 2, W, 2)
        torch.clamp(phases, 0.0, 1.0, out=out.view(m, height, 2, width, 2))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        m, _, height, width = z.shape
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
        by_phase = grad.reshape(m, height, 2, width, 2).permute(0, 2, 4, 1, 3)  # (M, 2, 2, H, W)
        torch.ops.aten.hardtanh_backward.grad_input(
            by_phase, z.view(m, 2, 2, height, width), 0.0, 1.0, grad_input=out.view(m, 2, 2, height, width)
        )
        return out


def interleave_unit_clamp(z: Tensor) -> Tensor:
    """``(M, 4, H, W) -> (M, 1, 2H, 2W)``: the phases interleaved and clamped to [0, 1] in one pass
    (:class:`_InterleaveUnitClamp`)."""
    return _InterleaveUnitClamp.apply(z.contiguous())
