"""``nn.Conv1d`` / ``nn.Conv2d`` (Conv1d is handled as a Conv2d of height 1).

Per-sample weight gradients: on the CPU one weight-gradient convolution with the batch as
groups; on other devices the unfolded input ``[B, positions, C·kh·kw]`` per group through the
fused per-sample op. The Hebbian sum is the convolution's weight gradient of |x| and |y|
(``docs/math.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ...errors import LayoutError
from ..statistics import widened
from .base import Rule, work_dtype


def _geometry(module: nn.Module):
    two_d = isinstance(module, nn.Conv2d)
    kernel = tuple(module.kernel_size) if two_d else (1, module.kernel_size[0])
    stride = tuple(module.stride) if two_d else (1, module.stride[0])
    dilation = tuple(module.dilation) if two_d else (1, module.dilation[0])
    return two_d, kernel, stride, dilation


def _padded(site) -> tuple[Tensor, tuple[int, int]]:
    """The input as [B, C, H, W] and the zero padding still to apply, as the layer pads it.

    Numeric zero padding is passed on to the kernels (no copy); 'same' (possibly
    asymmetric) and the other padding modes are applied here, as the layer does.
    """
    m = site.module
    x = site.x
    two_d, *_ = _geometry(m)
    expected = 4 if two_d else 3
    if x.dim() != expected or site.x_dim not in (0, None):
        raise LayoutError(
            f"module '{site.path}' ({type(m).__name__}) got an input of shape {tuple(x.shape)}; importance needs "
            f"a batched {expected}-D input with the batch dimension first"
        )
    if m.padding_mode == "zeros" and not isinstance(m.padding, str):
        pad = tuple(m.padding) if two_d else (0, m.padding[0])
    else:
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        pad = (0, 0)
    return (x if two_d else x.unsqueeze(2)), pad


def _operand(t: Tensor) -> Tensor:
    """cuDNN takes 16-bit operands as they are (fp32 accumulation inside); elsewhere compute in fp32 (fp64 for
    a float64 model)."""
    return t if t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) else widened(t)


def _as4d(t: Tensor, two_d: bool) -> Tensor:
    return t if two_d else t.unsqueeze(2)


def _unfolded_groups(m: nn.Module, xp: Tensor, pad: tuple[int, int], d: Tensor):
    """Yield (Ω row slice, Δ_g [B, L, O_g], unfolded x_g [B, L, C_g·k]) per group."""
    _, kernel, stride, dilation = _geometry(m)
    unf = F.unfold(xp, kernel, dilation=dilation, padding=pad, stride=stride)  # [B, C·kh·kw, L]
    out_g = m.out_channels // m.groups
    cols_g = unf.shape[1] // m.groups
    d = d.reshape(d.shape[0], m.out_channels, -1)
    for g in range(m.groups):
        yield (
            slice(g * out_g, (g + 1) * out_g),
            d[:, g * out_g : (g + 1) * out_g].transpose(1, 2),
            unf[:, g * cols_g : (g + 1) * cols_g].transpose(1, 2),
        )


def _plain_strides(t: Tensor) -> Tensor:
    """``t`` with row-major strides. A tensor with size-1 dimensions can be contiguous with strides that also
    read as channels-last ([1, C, 1, 1] with strides (C, 1, C, C)); the CPU's slow_conv2d (float64, a
    Conv1d's 2-D view) then allocates grad_weight channels-last and refuses it ("must be contiguous")."""
    return t.contiguous().view(-1).view(t.shape)


def _per_sample_weight_grads(m: nn.Module, xp: Tensor, pad: tuple[int, int], d: Tensor) -> Tensor:
    """Per-sample weight gradients ``[b, O, C/groups, kh, kw]`` in one weight-gradient convolution.

    The batch becomes groups: input ``[1, b·C, H, W]``, Δ ``[1, b·O, H', W']``, ``b·groups`` groups, so
    group (k, g) pairs sample k's channels of group g with its own outputs (the batch-as-groups idea of
    Rochette et al., "Efficient per-example gradient computations in convolutional neural networks", 2019).
    No unfolded input is materialised; on the CPU it runs at about the speed of the batch's weight gradient.
    """
    _, kernel, stride, dilation = _geometry(m)
    b = xp.shape[0]
    x1 = _plain_strides(xp.reshape(1, b * xp.shape[1], *xp.shape[2:]))
    d1 = _plain_strides(d.reshape(1, b * d.shape[1], *d.shape[2:]).to(x1.dtype))
    shape = (b * m.out_channels, m.in_channels // m.groups, *kernel)
    g = torch.nn.grad.conv2d_weight(x1, shape, d1, stride, pad, dilation, b * m.groups)
    return g.view(b, m.out_channels, m.in_channels // m.groups, *kernel)


def _grouped_on(device: torch.device) -> bool:
    """Where the batch-as-groups weight gradient is the per-sample method (measured: bench/results/); elsewhere
    the unfolded input goes through the fused per-sample op."""
    return device.type == "cpu"


def _weight_grad(m: nn.Module, x: Tensor, y: Tensor, pad) -> Tensor:
    _, kernel, stride, dilation = _geometry(m)
    shape = (m.out_channels, m.in_channels // m.groups, *kernel)
    return torch.nn.grad.conv2d_weight(x, shape, y.to(x.dtype), stride, pad, dilation, m.groups)


class ConvRule(Rule):
    param_names = ("weight", "bias")
    relies_on = ("forward", "_conv_forward")
    hebbian = True

    def check(self, acc, site, per_sample):
        super().check(acc, site, per_sample)
        if not per_sample and site.padded and acc.batch_samples > 1:
            # Co-activation events are the output positions, whose padding is unknown here: a convolution over
            # tokens is channels-first, and a causal one returns k − 1 positions more than the batch has (that a
            # sample alone computes from its own zero padding). Exact: each sample alone, unpadded.
            raise LayoutError(
                f"module '{site.path}' ({type(site.module).__name__}) convolves over the positions of a padded "
                "batch; which of its output positions are padding is unknown"
            )

    def add_sample_abs(self, acc, site, params):
        m = site.module
        two_d, kernel, _, _ = _geometry(m)
        xp, pad = _padded(site)
        d = _as4d(site.delta, two_d)
        w, b = params.get("weight"), params.get("bias")
        if w is not None and _grouped_on(xp.device):
            omega = acc.sum_of(w)
            for rows in acc.chunks(xp.shape[0], bytes_per_sample=8 * w.numel()):
                g = _per_sample_weight_grads(m, widened(xp[rows]), pad, d[rows])
                omega.add_(g.abs_().sum(0).view(omega.shape))
        elif w is not None:
            total = acc.sum_of(w)  # in the weight's memory format: a channels-last sum has no [O, C·k·k] view
            flat = (m.out_channels, total.numel() // m.out_channels)
            omega = total.view(flat) if total.is_contiguous() else total.new_zeros(flat)
            cols = xp.shape[1] * kernel[0] * kernel[1]
            scratch = acc.per_sample_scratch(omega.shape[0] // m.groups, omega.shape[1], xp.device)
            per_sample = scratch + 4 * (d.shape[2] * d.shape[3] * cols + d[0].numel())
            for rows in acc.chunks(xp.shape[0], bytes_per_sample=per_sample):
                for out_rows, d_g, x_g in _unfolded_groups(m, xp[rows], pad, d[rows]):
                    ops.eager.per_sample_abs_acc_(omega[out_rows], d_g, x_g, 1.0, acc.backend, acc.precision)
            if omega.data_ptr() != total.data_ptr():
                total.add_(omega.view(total.shape))
        if b is not None:
            acc.add_sum(b, widened(d).sum((2, 3)).abs().sum(0))

    def batch_grads(self, acc, site, params):
        m = site.module
        two_d, *_ = _geometry(m)
        xp, pad = _padded(site)
        d = _as4d(site.delta, two_d)
        out = {}
        if "weight" in params:
            out["weight"] = widened(_weight_grad(m, _operand(xp), d, pad)).view(params["weight"].shape)
        if "bias" in params:
            out["bias"] = widened(d).sum((0, 2, 3))
        return out

    def add_hebbian(self, acc, site, params):
        m = site.module
        two_d, *_ = _geometry(m)
        xp, pad = _padded(site)
        y = _as4d(site.judged_output, two_d)
        events = y.shape[0] * y.shape[2] * y.shape[3]
        if "weight" in params:
            w = params["weight"]
            xo = _operand(xp).abs()
            acc.add_sum(w, _weight_grad(m, xo, y.to(xo.dtype).abs(), pad).view(w.shape))
            acc.add_count(w, events)
        if "bias" in params:
            b = params["bias"]
            acc.add_sum(b, widened(y).abs().sum((0, 2, 3)))
            acc.add_count(b, events)

    def per_sample_grads(self, acc, site, params, rows):
        m = site.module
        two_d, *_ = _geometry(m)
        xp, pad = _padded(site)
        dt = work_dtype(xp, site.delta)
        d = _as4d(site.delta, two_d)[rows].to(dt)
        out = {}
        if "weight" in params and _grouped_on(xp.device):
            out["weight"] = _per_sample_weight_grads(m, xp[rows].to(dt), pad, d).reshape(
                d.shape[0], *params["weight"].shape
            )
        elif "weight" in params:
            parts = [
                torch.einsum("blo,bli->boi", d_g, x_g) for _, d_g, x_g in _unfolded_groups(m, xp[rows].to(dt), pad, d)
            ]
            out["weight"] = torch.cat(parts, dim=1).reshape(d.shape[0], *params["weight"].shape)
        if "bias" in params:
            out["bias"] = d.sum((2, 3))
        return out
