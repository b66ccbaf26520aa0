"""PyTorch -> edge bundle. The only torch-importing module of ``edge``.

Route: write the SGD step as a pure function with ``torch.func``,
trace it into plain aten ops with ``make_fx`` (with decompositions for the
backward ops the ONNX exporter lacks), export that graph with the dynamo ONNX
exporter, then check the ONNX graphs against PyTorch before the bundle is
declared written.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch import nn

from replaykit import codecs
from replaykit.fileio import atomic_write_bytes

from .bundle import (
    BUFFER, FORMAT_VERSION, FROZEN_LOCATION, MANIFEST, MODEL, MODES, PARAM_PREFIX, REPLAY, STATE_PREFIX, STORAGES, TRAIN_STEP,
    file_entry, step_session, write_manifest, write_tensors,
)
from .codec import WEIGHT_STORAGES, decode_parameters, decoder_factor, encode_parameters, has_view

aten = torch.ops.aten

# Every ONNX graph in a bundle must run on stock onnxruntime: default domain only.
ALLOWED_DOMAINS = ("", "ai.onnx")


# ----------------------------------------------------------------- decompositions
def _avg_pool2d_backward(grad, inp, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    """Non-overlapping average pooling backward: spread each gradient evenly over its window.

    One matrix product does it: each gradient row (w values) times a 0 / ``1/(kh*kw)`` matrix gives the kh
    output rows it covers side by side (kh*w*kw values, one non-zero term per output: ``grad * (1/(kh*kw))``,
    bit for bit ``grad / (kh*kw)`` for 2x2 windows), and a reshape lays them out as rows. (Repeating rows
    with Expand copied runs of one row at a time: the slowest element-wise node of a full-mode step in
    onnxruntime's profiler.)"""
    kh, kw = kernel
    if tuple(stride) not in ((kh, kw), ()) or any(padding) or ceil_mode or divisor is not None:
        raise NotImplementedError("edge export supports only non-overlapping, unpadded average pooling")
    n, c, h, w = grad.shape
    column = torch.arange(kh * w * kw, device=grad.device) % (w * kw) // kw
    spread = (column == torch.arange(w, device=grad.device)[:, None]).to(grad.dtype)      # [w, kh*w*kw]
    g = (grad.reshape(n * c * h, w) @ (spread / (kh * kw))).reshape(n, c, h * kh, w * kw)
    if tuple(g.shape[2:]) == tuple(inp.shape[2:]):
        return g
    # Rows / columns that floor-mode pooling dropped get no gradient.
    return F.pad(g, (0, inp.shape[3] - g.shape[3], 0, inp.shape[2] - g.shape[2]))


def _threshold_backward(grad, inp, threshold):
    """ReLU backward as ``grad * ceil(clamp(inp - threshold, 0, 1))``, the mask ``inp > threshold`` as 0 / 1 floats,
    which :func:`_relu_masks_as_hard_sigmoid` makes one HardSigmoid after export (0.39 ms on 64 MNIST maps of 32
    channels, where a Greater and a Cast of the bool map took 0.49 + 0.65 ms, and onnxruntime's Where about as long
    as a convolution). The same values, up to the sign of a zero."""
    return grad * (inp - threshold if threshold else inp).clamp(0, 1).ceil()


def _conv_weight_grad(grad, inp, kh: int, kw: int, ph: int, pw: int) -> torch.Tensor:
    """dL/dW of a stride-1 convolution with few input channels: the taps stacked into one product over the batch.

    The textbook form, a convolution of the input with the output gradient as kernel, hands onnxruntime a
    28x28 kernel over the batch as channels: its slowest node, about a third of a full-mode MNIST step.
    Here tap (i, j) of every filter is (out channels x pixels) times (pixels x in channels), all taps in one
    product over the whole batch (a matrix-vector product per tap is slow)."""
    c_out, c_in = grad.shape[1], inp.shape[1]
    h_out, w_out = grad.shape[2], grad.shape[3]
    padded = F.pad(inp.transpose(0, 1), (pw, pw, ph, ph))                             # [Ci, N, Hp, Wp]
    rows = grad.transpose(0, 1).reshape(c_out, -1)                                     # [Co, N*P]
    shifted = [padded[:, :, i: i + h_out, j: j + w_out].reshape(c_in, -1) for i in range(kh) for j in range(kw)]
    return (rows @ torch.cat(shifted).t()).reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2)


#: From this many input channels on, a convolution, its input gradient and its weight gradient are products of
#: :func:`_pixel_major_columns`; fewer keep onnxruntime's Conv and :func:`_conv_weight_grad`.
_PIXEL_MAJOR_MIN_CHANNELS = 8


def _conv_output_size(h: int, w: int, kh: int, kw: int, ph: int, pw: int) -> tuple[int, int]:
    """The output height and width of a stride-1, undilated convolution with a ``kh x kw`` kernel and ``ph, pw`` padding."""
    return h + 2 * ph - kh + 1, w + 2 * pw - kw + 1


def _pixel_major_columns(nhwc: torch.Tensor, kh: int, kw: int, ph: int, pw: int,
                         order: torch.Tensor | None = None) -> torch.Tensor:
    """im2col with pixels as rows: channels-last [N, H, W, C] -> [N, H_out*W_out, kh*kw*C] for a stride-1
    convolution, pixels row-major or in ``order`` (the row-major index of each row).

    onnxruntime's Conv multiplies (out channels x taps*channels) by (taps*channels x pixels) per image, at less
    than half the rate of its matrix product with pixels as rows (a 32 -> 32 3x3 convolution of 64 14x14 maps:
    1.9 ms against 0.75 ms at two threads; oneDNN, PyTorch's, takes 0.9 ms). The columns are one Gather of the
    flattened, padded, channels-last map (whole channel runs per copy); nine Slices and a Concat of the same
    columns took three times as long."""
    n, h, w, c = nhwc.shape
    h_out, w_out = _conv_output_size(h, w, kh, kw, ph, pw)
    flat = F.pad(nhwc, (0, 0, pw, pw, ph, ph)).reshape(n, -1, c)                          # [N, Hp*Wp, C]
    arange = functools.partial(torch.arange, device=nhwc.device)
    if order is None:
        order = arange(h_out * w_out)
    row = (order // w_out)[:, None, None] + arange(kh)[None, :, None]
    col = (order % w_out)[:, None, None] + arange(kw)[None, None, :]
    index = (row * (w + 2 * pw) + col).reshape(-1)                                        # pixel-major, tap-minor
    return flat.index_select(1, index).reshape(n, h_out * w_out, kh * kw * c)


def _plain_convolution(weight, stride, dilation, transposed, groups) -> bool:
    """A 2-D, stride-1, undilated, single-group, non-transposed convolution: what these decompositions handle."""
    return not transposed and groups == 1 and weight.ndim == 4 and all(s == 1 for s in stride) and all(d == 1 for d in dilation)


def _convolution(inp, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """Convolutions with many input channels as one product of the pixel-major columns with the weight (the weight
    gradient reuses the columns); the rest stay onnxruntime's Conv."""
    if not _plain_convolution(weight, stride, dilation, transposed, groups) or inp.shape[1] < _PIXEL_MAJOR_MIN_CHANNELS:
        return NotImplemented
    n = inp.shape[0]
    c_out, c_in, kh, kw = weight.shape
    columns = _pixel_major_columns(inp.permute(0, 2, 3, 1), kh, kw, padding[0], padding[1])
    h_out, w_out = _conv_output_size(inp.shape[2], inp.shape[3], kh, kw, *padding)
    out = columns.reshape(-1, kh * kw * c_in) @ weight.permute(0, 2, 3, 1).reshape(c_out, -1).t()
    if bias is not None:
        out = out + bias
    return out.reshape(n, h_out, w_out, c_out).permute(0, 3, 1, 2)


def _convolution_backward(grad, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask):
    """Conv2d backward (stride 1, no dilation, one group): the input gradient as a forward convolution (so
    pixel-major too where the gradient has many channels); the weight gradient as per-image products of the
    input's pixel-major columns, the forward's own, with the channels-last output gradient, the input gradient's
    own, where the input has many channels."""
    if not _plain_convolution(weight, stride, dilation, transposed, groups):
        raise NotImplementedError("edge export supports plain stride-1 Conv2d layers only")
    kh, kw = weight.shape[2], weight.shape[3]
    ph, pw = padding
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        flipped = weight.flip(2, 3).transpose(0, 1)
        grad_input = F.conv2d(grad, flipped, padding=(kh - 1 - ph, kw - 1 - pw))
    if mask[1] and inp.shape[1] >= _PIXEL_MAJOR_MIN_CHANNELS:
        # (taps*in channels x pixels) times (pixels x out channels) per image, summed over the batch: about half
        # the time of one product per tap (a 32 -> 32 3x3 layer on 64 14x14 maps: 2.2 ms against 4.1 ms).
        n, c_out = grad.shape[:2]
        channels_last = grad.permute(0, 2, 3, 1).reshape(n, -1, c_out)                 # as the input gradient's
        per_image = _pixel_major_columns(inp.permute(0, 2, 3, 1), kh, kw, ph, pw).transpose(1, 2) @ channels_last
        grad_weight = per_image.sum(0).reshape(kh, kw, inp.shape[1], c_out).permute(3, 2, 0, 1)
    elif mask[1]:
        grad_weight = _conv_weight_grad(grad, inp, kh, kw, ph, pw)
    if mask[2]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias


def _mean_over_last_two(t: torch.Tensor) -> torch.Tensor:
    """float64 mean over the last two axes: float32 sums along the (short) last axis, float64 beyond.

    onnxruntime's float32 ReduceSum / ReduceMean over a whole feature map (784 values on MNIST)
    accumulate enough round-off to flip the sign of ReLU inputs within ~1e-7 of zero that PyTorch's
    group norm (cascade sums) gets right; summing rows of one map row in float32 and the row sums in
    float64 is ~7x more accurate, and no float64 copy of the feature map is made."""
    return t.sum(-1).double().sum(-1) / (t.shape[-1] * t.shape[-2])


def _native_group_norm(input, weight, bias, batch_size, num_channels, flattened_inner_size, num_groups, eps):
    """Group norm forward for the exported graphs, with statistics accurate to about float32 rounding.

    Same outputs as aten's (normalised input, float32 mean and rstd per group, which the decomposed
    backward reuses), but: the mean and the biased variance come from a corrected two-pass algorithm
    whose sums are taken by ``_mean_over_last_two``, and each channel's scale (rstd * weight) and shift
    (bias - mean * scale) are computed in float64 and rounded once, and the output is formed from the
    centred input. Inputs other than float32 [N, C, H, W] use aten's decomposition."""
    from torch._decomp import decomposition_table

    if input.ndim != 4 or input.dtype != torch.float32:
        return decomposition_table[aten.native_group_norm.default](
            input, weight, bias, batch_size, num_channels, flattened_inner_size, num_groups, eps)
    per_group = num_channels // num_groups
    x = input.reshape(batch_size, num_groups, per_group * input.shape[2], input.shape[3])
    rough = _mean_over_last_two(x).float()                               # [N, G], a float32 first-pass mean
    centred = x - rough[:, :, None, None]                                # float32, rounded relative to |x - mean|
    correction = _mean_over_last_two(centred)                            # float64: mean = rough + correction
    var = (_mean_over_last_two(centred * centred) - correction * correction).clamp_min(0.0)
    rstd = torch.rsqrt(var + eps)
    scale = rstd[:, :, None].expand(batch_size, num_groups, per_group)
    if weight is not None:
        scale = scale * weight.double().reshape(1, num_groups, per_group)
    shift = -correction[:, :, None] * scale
    if bias is not None:
        shift = shift + bias.double().reshape(1, num_groups, per_group)
    scale = scale.float().reshape(batch_size, num_groups, per_group, 1)
    shift = shift.float().reshape(batch_size, num_groups, per_group, 1)
    # (x - rough) * scale + shift: near a ReLU's zero the product is about -bias, not -mean * scale, so
    # its rounding does not grow with mean / std (as x * scale + (bias - mean * scale) does).
    out = (centred.reshape(batch_size, num_groups, per_group, -1) * scale + shift).reshape(input.shape)
    return out, (rough.double() + correction).float(), rstd.float()


def _decompositions(pixel_major_forward: bool = True) -> dict:
    """The exporter's decomposition table. ``pixel_major_forward=False`` keeps forward convolutions as Conv: the
    pixel-major form pays only where a weight gradient reuses its columns (an inference graph or a head-mode step
    with it ran 12-45 % slower)."""
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    # Group norm as plain reductions: the exporter's InstanceNormalization forward does not
    # share its statistics with the decomposed backward, which drifts from PyTorch over many steps.
    table[aten.native_group_norm.default] = _native_group_norm
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    if pixel_major_forward:
        table[aten.convolution.default] = _convolution
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.threshold_backward.default] = _threshold_backward
    return table


def _drop_unit_sums(graph: torch.fx.GraphModule) -> int:
    """Remove sums over axes of length 1 (copies) from a traced graph; returns how many were removed.

    Group norm's decomposed backward sums over the channels of a group, which is one channel when every
    channel is its own group (instance norm, the ConvNet's default). onnxruntime's ReduceSum over such an
    axis took ~0.3 ms each in its profiler: about a tenth of a full-mode MNIST step for no arithmetic."""
    removed = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
            continue
        source, dims = node.args[0], node.args[1]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        before, after = source.meta.get("val"), node.meta.get("val")
        if before is None or after is None or before.dtype != after.dtype or not dims:
            continue
        if not all(isinstance(before.shape[d], int) and before.shape[d] == 1 for d in dims):
            continue
        if keepdim:
            node.replace_all_uses_with(source)
        else:
            with graph.graph.inserting_before(node):
                squeezed = graph.graph.call_function(aten.squeeze.dims, (source, list(dims)))
            squeezed.meta["val"] = after
            node.replace_all_uses_with(squeezed)
        graph.graph.erase_node(node)
        removed += 1
    graph.graph.lint()
    graph.recompile()
    return removed


def _shared_repeats(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """One node for computations traced twice: a convolution's pixel-major columns (its forward and its weight
    gradient) and its channels-last output gradient (its input and weight gradients); onnxruntime runs both."""
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    shared = CSEPass()(graph).graph_module
    shared.recompile()
    return shared


def _taps_with_ones(x: torch.Tensor, kh: int, kw: int, ph: int, pw: int, pooled: bool = False) -> torch.Tensor:
    """[N, C, H, W] -> [N, C*kh*kw + 1, H_out*W_out]: each channel's taps in the weight's order, then a row of ones
    (so one product also gives the plain sums). Pixels come row-major, or with ``pooled`` (even H_out, W_out) in the
    order of a 2x2 pooling's four phases: the (0, 0) pixels, (0, 1), (1, 0), (1, 1), each row-major over the pooled
    map. There a tap of one phase is a window of one of the padded input's own four phases, so the taps are a few
    windows and one Gather of whole windows (a Gather per pixel took 0.7 ms on MNIST, this 0.1)."""
    n, c, h, w = x.shape
    h_out, w_out = _conv_output_size(h, w, kh, kw, ph, pw)
    if not pooled:
        padded = F.pad(x, (pw, pw, ph, ph))
        taps = torch.stack([padded[:, :, i: i + h_out, j: j + w_out] for i in range(kh) for j in range(kw)], 2)
        taps = taps.reshape(n, c * kh * kw, h_out * w_out)
    else:
        hh, wh = h_out // 2, w_out // 2
        oy, ox = kh // 2 + 1, kw // 2 + 1                              # window offsets within a phase
        padded = F.pad(x, (pw, 2 * (wh + ox - 1) - w - pw, ph, 2 * (hh + oy - 1) - h - ph))
        phases = torch.stack([padded[:, :, a::2, b::2] for a in range(2) for b in range(2)], 2)
        phases = phases.reshape(n, c, 2, 2, hh + oy - 1, wh + ox - 1)               # [N, C, 2, 2, H', W']
        windows = torch.stack([phases[..., a: a + hh, b: b + wh] for a in range(oy) for b in range(ox)], 2)
        windows = windows.reshape(n, c, oy * ox * 4, hh * wh)         # (offset, phase) windows
        arange = functools.partial(torch.arange, device=x.device)
        row = arange(kh)[:, None, None, None] + arange(2)[None, None, :, None]   # i + dy, [kh, 1, 2, 1]
        col = arange(kw)[None, :, None, None] + arange(2)[None, None, None, :]   # j + dx, [1, kw, 1, 2]
        index = ((row // 2 * ox + col // 2) * 4 + row % 2 * 2 + col % 2).reshape(-1)   # (i, j, dy, dx)
        taps = windows.index_select(2, index).reshape(n, c * kh * kw, h_out * w_out)
    return torch.cat([taps, torch.ones_like(taps[:, :1])], 1)


class _FirstBlock(torch.autograd.Function):
    """The network's first convolution and its group norm (and, with ``pooled``, the ReLU and 2x2 average pooling
    after them), traced for the step graph with a forward and a backward written out.

    Forward: the norm's statistics come from the filter's response to the taps centred on their means (two sums of
    it); its scale and shift then fold into one weight per image, so the normalised output is a second product of
    the same taps instead of a centring, a scaling and a shift over the feature map. With ``pooled`` the pixels
    come in the pooling's four phases, so pooling is a sum of four contiguous quarters and its backward a broadcast
    over them.

    Backward: the first layer needs no input gradient, and its weight gradient is linear in the norm's input gradient
    ``c1 * g + c2 * y + c3`` (per sample and channel ``c``; ``y`` the convolution's output). Against each tap of the
    input, ``g`` needs one product per image ([C x pixels] x [pixels x taps]); ``y`` is the convolution of the input,
    so its sums against the taps are the weight times the taps' Gram matrix (terms combined in float64). The norm's
    sums over ``g`` and ``g * y`` come out of the same products."""

    @staticmethod
    def forward(x, weight, bias, gamma, beta, groups: int, eps: float, padding: tuple[int, int], pooled: bool):
        n, c = x.shape[0], weight.shape[0]
        kh, kw = weight.shape[2], weight.shape[3]
        h, w = _conv_output_size(x.shape[2], x.shape[3], kh, kw, *padding)
        taps = _taps_with_ones(x, kh, kw, padding[0], padding[1], pooled)   # [N, T+1, P]
        t = taps.shape[1] - 1
        # Taps about their own float32-rounded means ``r`` (the ones row kept), for the statistics and the product:
        # near the ReLU's zero the product's terms are then about the input's spread and the norm's shift, not its
        # mean (as `_native_group_norm` centres its input).
        sums = _mean_over_last_two(taps.reshape(n, t + 1, -1, w)) * (h * w)   # [N, T+1], float64
        rough = (sums / (h * w)).to(x.dtype)
        rough = torch.cat([rough[:, :t], torch.zeros_like(rough[:, t:])], 1)
        centred = taps - rough[:, :, None]
        moments = (centred @ centred.transpose(1, 2)).double()              # [N, T+1, T+1] about r
        # The raw Gram matrix, in float64, for the backward: sum (x - r)(x - r)' + r s' + s r' - P r r'.
        r64 = rough.double()
        outer = r64[:, :, None] * sums[:, None, :]
        gram = moments + outer + outer.transpose(1, 2) - (h * w) * r64[:, :, None] * r64[:, None, :]
        # The norm's statistics from the filter's response to the centred taps, summed as `_mean_over_last_two`
        # does: its variance from the Gram matrix (w' Cov w) lost most of float32's digits on images, whose
        # neighbouring pixels are strongly correlated (1.7e-5 relative error at the ReLU, PyTorch's 1.4e-7).
        w64 = weight.reshape(c, t).double()
        response = centred.transpose(1, 2) @ torch.cat([weight.reshape(c, t), torch.zeros_like(bias)[:, None]], 1).T
        response = response.reshape(n, -1, w, c)                            # [N, P / W, W, C], w . (x - r)
        first = response.sum(2).double().sum(1) / (h * w)                   # [N, C]
        second = (response * response).sum(2).double().sum(1) / (h * w)
        mean_at_rough = r64[:, :t] @ w64.T + bias.double()                   # the output at the taps' r, [N, C]
        mean_c = first + mean_at_rough
        var_c = (second - first * first).clamp_min(0.0)
        per_group = c // groups
        mean_g = mean_c.reshape(n, groups, per_group).mean(2)                # [N, G]
        spread = (mean_c.reshape(n, groups, per_group) - mean_g[:, :, None]) ** 2
        var_g = (var_c.reshape(n, groups, per_group) + spread).mean(2)
        rstd = torch.rsqrt(var_g + eps)
        scale = (rstd[:, :, None] * gamma.double().reshape(1, groups, per_group)).reshape(n, c)
        shift = beta.double() + (mean_at_rough - mean_g[:, :, None].expand(n, groups, per_group).reshape(n, c)) * scale
        folded = torch.cat([scale[:, :, None] * w64, shift[:, :, None]], 2).to(x.dtype)   # [N, C, T+1]
        out = centred.transpose(1, 2) @ folded.transpose(1, 2)               # [N, P, C]: channels last
        stats = (mean_g.to(x.dtype), rstd.to(x.dtype), taps, gram)
        if not pooled:
            return out.reshape(n, h, w, c), *stats, out[:, :0]
        active = out.clamp(0, 1).ceil()                                     # the ReLU's mask (one HardSigmoid)
        out = torch.relu(out).reshape(n, 4, -1, c).sum(1) * 0.25
        return out.reshape(n, h // 2, w // 2, c), *stats, active

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _x, weight, bias, gamma, _beta, groups, _eps, _padding, pooled = inputs
        _out, mean, rstd, taps, gram, active = output
        ctx.save_for_backward(weight, bias, gamma, mean, rstd, taps, gram, active)
        ctx.groups, ctx.pooled = groups, pooled
        ctx.mark_non_differentiable(mean, rstd, taps, gram, active)

    @staticmethod
    def backward(ctx, grad, *_not_differentiable):
        weight, bias, gamma, mean, rstd, taps, gram, active = ctx.saved_tensors
        groups = ctx.groups
        n, c = grad.shape[0], grad.shape[3]
        per_group = c // groups
        t, p = taps.shape[1] - 1, taps.shape[2]
        if ctx.pooled:   # pooling's backward (a broadcast over the four phases) and the ReLU's
            grad = active.reshape(n, 4, -1, c) * (grad.reshape(n, 1, -1, c) * 0.25)
        grad_taps = taps @ grad.reshape(n, p, c)                                 # [N, T+1, C]: sums of g * tap
        weight_and_bias = torch.cat([weight.reshape(c, t), bias.reshape(c, 1)], 1).T   # [T+1, C]
        db = grad_taps[:, t, :]                                                  # sum of g
        ds = (grad_taps * weight_and_bias).sum(1)                                # sum of g * y
        # aten's group norm backward coefficients (input gradient = c1 * g + c2 * y + c3), in float64.
        mean64, rstd64 = mean.double(), rstd.double()
        ds_group = (ds * gamma).reshape(n, groups, per_group).sum(2).double()
        db_group = (db * gamma).reshape(n, groups, per_group).sum(2).double()
        scale = 1.0 / (p * per_group)
        c2 = (db_group * mean64 - ds_group) * rstd64 * rstd64 * rstd64 * scale
        c3 = -c2 * mean64 - db_group * rstd64 * scale
        c1 = (rstd64[:, :, None] * gamma.double().reshape(1, groups, per_group)).reshape(n, 1, c)
        c2 = c2[:, :, None].expand(n, groups, per_group).reshape(n, 1, c)
        c3 = c3[:, :, None].expand(n, groups, per_group).reshape(n, 1, c)
        y_taps = gram @ weight_and_bias.double()                                 # [N, T+1, C]: sums of y * tap
        d_all = (c1 * grad_taps.double() + c2 * y_taps + c3 * gram[:, :, t:]).sum(0)   # [T+1, C]
        d_weight = d_all[:t].T.to(weight.dtype).reshape(weight.shape)
        d_bias = d_all[t].to(bias.dtype)
        mean_c = mean.reshape(n, groups, 1).expand(n, groups, per_group).reshape(n, c)
        rstd_c = rstd.reshape(n, groups, 1).expand(n, groups, per_group).reshape(n, c)
        d_gamma = ((ds - db * mean_c) * rstd_c).sum(0)
        return None, d_weight, d_bias, d_gamma, db.sum(0), None, None, None, None


def _fusable_first_block(model: nn.Module) -> nn.Sequential | None:
    """The block that sees the input when it starts with a plain Conv2d (with bias) and an affine GroupNorm."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not len(features) or not isinstance(features[0], nn.Sequential):
        return None
    block = features[0]
    if len(block) < 2 or not isinstance(block[0], nn.Conv2d) or not isinstance(block[1], nn.GroupNorm):
        return None
    return block if _plain_conv_with_bias(block[0]) and block[1].affine else None


def _plain_conv_with_bias(conv: nn.Conv2d) -> bool:
    """A stride-1, undilated, single-group, zero-padded Conv2d with a bias and numeric padding."""
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _halving_avg_pool(pool: nn.Module) -> bool:
    """A floor-mode, unpadded 2x2 average pooling with stride 2."""
    return (isinstance(pool, nn.AvgPool2d) and _pair(pool.kernel_size) == (2, 2)
            and _pair(pool.stride or pool.kernel_size) == (2, 2) and _pair(pool.padding) == (0, 0)
            and not pool.ceil_mode and pool.divisor_override is None)


def _pools_by_two(block: nn.Sequential, x: torch.Tensor) -> bool:
    """Whether the fused block goes on with a ReLU and a 2x2 average pooling that tiles its (even-sized) output."""
    if len(block) < 4 or not isinstance(block[2], nn.ReLU) or not _halving_avg_pool(block[3]):
        return False
    conv = block[0]
    h, w = _conv_output_size(x.shape[2], x.shape[3], *conv.kernel_size, *conv.padding)
    return h % 2 == 0 and w % 2 == 0


def _first_block_forward(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv, norm = block[0], block[1]
    pooled = _pools_by_two(block, x)
    out = _FirstBlock.apply(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.num_groups, norm.eps,
                            tuple(conv.padding), pooled)[0].permute(0, 3, 1, 2)   # a pixel-major next layer undoes it
    for layer in block[4 if pooled else 2:]:
        out = layer(out)
    return out


def _pooling_order(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of an [h, w] map in the order of a floor-mode 2x2 pooling's phases: the (0, 0) pixels of the pooled
    region, then (0, 1), (1, 0), (1, 1) (each row-major over the pooled map), then what the pooling drops (rows, then
    columns). Returns ``order`` (the row-major index of each position) and ``position`` (its inverse)."""
    hh, wh = h // 2, w // 2
    arange = functools.partial(torch.arange, device=device)
    ids = arange(h * w).reshape(h, w)
    order = torch.cat([ids[: 2 * hh, : 2 * wh].reshape(hh, 2, wh, 2).permute(1, 3, 0, 2).reshape(-1),
                       ids[2 * hh:].reshape(-1), ids[: 2 * hh, 2 * wh:].reshape(-1)])
    y, x = arange(h)[:, None], arange(w)[None, :]
    pooled = (y % 2 * 2 + x % 2) * (hh * wh) + y // 2 * wh + x // 2
    dropped_row = 4 * hh * wh + (y - 2 * hh) * w + x
    dropped_col = 4 * hh * wh + (h - 2 * hh) * w + y * (w - 2 * wh) + (x - 2 * wh)
    position = torch.where(y >= 2 * hh, dropped_row, torch.where(x >= 2 * wh, dropped_col, pooled)).reshape(-1)
    return order, position


class _ChannelsLastBlock(torch.autograd.Function):
    """A block after the first (convolution with many input channels, group norm, ReLU, 2x2 average pooling) on
    channels-last maps with pixels in the pooling's phase order, forward and backward written out for the step graph.

    The convolution is one product of the pixel-major columns (a Gather whose index also puts the pixels in phase
    order), the norm reduces over pixels of the channels-last map, pooling sums four contiguous quarters; backward,
    the pooling is a broadcast, the norm aten's coefficient form ``c1 * g + c2 * z + c3``, the weight gradient the
    columns against the gradient per image, and the input gradient one product of the gradient's own columns (a
    Gather from the phase-ordered gradient with a zero row for the padding) with the flipped weight. Traced through
    channels-first modules, each block had cost two transposes of its map each way and onnxruntime's pooling."""

    @staticmethod
    def forward(x, weight, bias, gamma, beta, groups: int, eps: float, padding: tuple[int, int]):
        n, h_in, w_in, c_in = x.shape
        c, _, kh, kw = weight.shape
        h, w = _conv_output_size(h_in, w_in, kh, kw, *padding)
        order, _ = _pooling_order(h, w, x.device)
        columns = _pixel_major_columns(x, kh, kw, padding[0], padding[1], order)            # [N, P, kh*kw*Ci]
        z = (columns.reshape(-1, kh * kw * c_in) @ weight.permute(0, 2, 3, 1).reshape(c, -1).t() + bias).reshape(n, h * w, c)
        # Group norm as `_native_group_norm` computes it: a float32 first-pass mean, sums of rows in float32 and
        # beyond in float64, the scale and shift rounded once.
        per_group = c // groups
        count = h * w * per_group

        def group_sums(t):   # [N, P, C] -> float64 [N, G]
            return t.reshape(n, h, w, groups, per_group).sum(2).double().sum((1, 3))

        def per_channel(t):  # [N, G] -> [N, 1, C]
            return t[:, :, None].expand(n, groups, per_group).reshape(n, 1, c)

        rough = (group_sums(z) / count).to(x.dtype)
        centred = z - per_channel(rough)
        correction = group_sums(centred) / count
        var = (group_sums(centred * centred) / count - correction * correction).clamp_min(0.0)
        rstd = torch.rsqrt(var + eps)
        scale = per_channel(rstd) * gamma.double()
        shift = beta.double() - per_channel(correction) * scale
        y = centred * scale.to(x.dtype) + shift.to(x.dtype)
        active = y.clamp(0, 1).ceil()                                       # the ReLU's mask (one HardSigmoid)
        quarter = (h // 2) * (w // 2)
        out = torch.relu(y[:, : 4 * quarter]).reshape(n, 4, quarter, c).sum(1) * 0.25
        return out.reshape(n, h // 2, w // 2, c), columns, centred, correction.to(x.dtype), rstd.to(x.dtype), active

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, gamma, _beta, groups, _eps, padding = inputs
        _out, columns, centred, correction, rstd, active = output
        ctx.save_for_backward(weight, gamma, columns, centred, correction, rstd, active)
        ctx.groups, ctx.padding, ctx.in_shape = groups, padding, tuple(x.shape[1:3])
        ctx.mark_non_differentiable(columns, centred, correction, rstd, active)

    @staticmethod
    def backward(ctx, grad, *_not_differentiable):
        weight, gamma, columns, centred, correction, rstd, active = ctx.saved_tensors
        groups, (ph, pw), (h_in, w_in) = ctx.groups, ctx.padding, ctx.in_shape
        c, c_in, kh, kw = weight.shape
        n, hh, wh = grad.shape[0], grad.shape[1], grad.shape[2]
        p = centred.shape[1]
        per_group = c // groups
        # Pooling's backward (a broadcast over the phases; dropped pixels get nothing) and the ReLU's.
        g = active[:, : 4 * hh * wh].reshape(n, 4, hh * wh, c) * (grad.reshape(n, 1, hh * wh, c) * 0.25)
        g = g.reshape(n, 4 * hh * wh, c)
        if p > 4 * hh * wh:
            g = torch.cat([g, torch.zeros_like(centred[:, 4 * hh * wh:])], 1)
        # Group norm: input gradient = c1 * g + c2 * centred + c3 (aten's coefficients about the rough mean).
        ds = (g * centred).sum(1)                                            # [N, C]
        db = g.sum(1)
        ds_group = (ds * gamma).reshape(n, groups, per_group).sum(2)
        db_group = (db * gamma).reshape(n, groups, per_group).sum(2)
        scale = 1.0 / (p * per_group)
        c2 = (db_group * correction - ds_group) * rstd * rstd * rstd * scale
        c3 = -c2 * correction - db_group * rstd * scale
        c1 = rstd[:, :, None] * gamma.reshape(1, groups, per_group)

        def per_channel(t):
            return t.reshape(n, groups, -1).expand(n, groups, per_group).reshape(n, 1, c)

        g_z = g * per_channel(c1) + (centred * per_channel(c2) + per_channel(c3))        # [N, P, C]
        correction_c = per_channel(correction).reshape(n, c)
        d_gamma = ((ds - db * correction_c) * per_channel(rstd).reshape(n, c)).sum(0)
        d_beta = db.sum(0)
        d_bias = g_z.sum((0, 1))
        d_weight = (columns.transpose(1, 2) @ g_z).sum(0).reshape(kh, kw, c_in, c).permute(3, 2, 0, 1)
        # Input gradient: for input pixel (y, x) and tap (i, j), the gradient at output (y + ph - i, x + pw - j),
        # found by its phase-order position, or the zero row past the end where that is outside the map.
        h, w = _conv_output_size(h_in, w_in, kh, kw, ph, pw)
        _, position = _pooling_order(h, w, grad.device)
        arange = functools.partial(torch.arange, device=grad.device)
        yo = arange(h_in)[:, None, None, None] + ph - arange(kh)[None, None, :, None]
        xo = arange(w_in)[None, :, None, None] + pw - arange(kw)[None, None, None, :]
        inside = (yo >= 0) & (yo < h) & (xo >= 0) & (xo < w)
        index = torch.where(inside, position[(yo.clamp(0, h - 1) * w + xo.clamp(0, w - 1))], p).reshape(-1)
        padded = torch.cat([g_z, torch.zeros_like(g_z[:, :1])], 1)          # [N, P + 1, C]
        grad_columns = padded.index_select(1, index).reshape(n * h_in * w_in, kh * kw * c)
        d_x = (grad_columns @ weight.permute(2, 3, 0, 1).reshape(kh * kw * c, c_in)).reshape(n, h_in, w_in, c_in)
        return d_x, d_weight, d_bias, d_gamma, d_beta, None, None, None


def _fusable_later_block(block: nn.Module) -> bool:
    """A block after the first that :class:`_ChannelsLastBlock` computes: a plain Conv2d with bias and many input
    channels, an affine GroupNorm, a ReLU and a 2x2 average pooling, nothing else."""
    if not isinstance(block, nn.Sequential) or len(block) != 4:
        return False
    conv, norm, relu, pool = block
    return (isinstance(conv, nn.Conv2d) and conv.in_channels >= _PIXEL_MAJOR_MIN_CHANNELS and _plain_conv_with_bias(conv)
            and isinstance(norm, nn.GroupNorm) and norm.affine and isinstance(relu, nn.ReLU) and _halving_avg_pool(pool))


def _later_block_forward(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv, norm = block[0], block[1]
    out = _ChannelsLastBlock.apply(x.permute(0, 2, 3, 1), conv.weight, conv.bias, norm.weight, norm.bias,
                                   norm.num_groups, norm.eps, tuple(conv.padding))[0]
    return out.permute(0, 3, 1, 2)   # channels-first for the modules around it; onnxruntime cancels the transposes


# ----------------------------------------------------------------- pure functions
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(p * log softmax); one-hot rows give the usual cross-entropy.

    Written out (rather than ``F.cross_entropy``) so the traced backward is plain
    elementwise ops: exporting ``nll_loss_backward`` scales the gradient by the batch size.
    """
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def replay_loss(logits: torch.Tensor, targets: torch.Tensor, ce_weight: torch.Tensor, logit_weight: torch.Tensor) -> torch.Tensor:
    """The step's loss, row by row: ``sum_i ce_weight_i * CE(z_i, t_i) + logit_weight_i * ||z_i - t_i||^2``.

    A row is either a labelled sample (``targets`` a probability row, ``ce_weight`` 1/rows: the batch mean of
    :func:`soft_cross_entropy`) or a logit-replay sample (``targets`` the held logits, ``logit_weight``
    w / (rows * K): DER's ``w * mse_loss``, as the host's ``DistilledReplayPlugin`` adds it). Weights are
    normalised over the whole step, so micro-batches' gradients simply add up."""
    ce = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)
    squared = (logits - targets).square().sum(dim=1)
    return (ce * ce_weight).sum() + (squared * logit_weight).sum()


def mean_weights(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce_weight, logit_weight) of a plain step: every row labelled, the batch mean of the cross-entropy."""
    return torch.full((rows,), 1.0 / rows), torch.zeros(rows)


def make_step_fn(model: nn.Module, frozen: Sequence[str], trainable: Sequence[str]) -> Callable:
    """(frozen..., trainable..., state..., x, targets, ce_weight, logit_weight, lr, momentum, weight_decay)
    -> (loss, new params..., new state...); the loss is :func:`replay_loss`."""
    from torch.func import functional_call, grad_and_value

    nf, nt = len(frozen), len(trainable)

    def loss_of(train: dict, fixed: dict, x: torch.Tensor, targets: torch.Tensor, ce_weight: torch.Tensor,
                logit_weight: torch.Tensor) -> torch.Tensor:
        return replay_loss(functional_call(model, {**fixed, **train}, (x,)), targets, ce_weight, logit_weight)

    # The traced step only: the first block without the norm's input gradient, the later ones channels-last.
    trained = {id(p) for name, p in model.named_parameters() if name in trainable}
    first = _fusable_first_block(model)
    patches = {first: _first_block_forward} if first is not None and id(first[0].weight) in trained else {}
    for block in list(getattr(model, "features", []))[1:]:
        if _fusable_later_block(block) and id(block[0].weight) in trained:
            patches[block] = _later_block_forward

    def step(*args: torch.Tensor):
        for block, forward in patches.items():
            block.forward = functools.partial(forward, block)
        try:
            return _step(*args)
        finally:
            for block in patches:
                del block.forward

    def _step(*args: torch.Tensor):
        fixed = dict(zip(frozen, args[:nf]))
        params = args[nf: nf + nt]
        state = args[nf + nt: nf + 2 * nt]
        x, targets, ce_weight, logit_weight, lr, momentum, weight_decay = args[nf + 2 * nt:]
        grads, loss = grad_and_value(loss_of)(dict(zip(trainable, params)), fixed, x, targets, ce_weight, logit_weight)
        # torch.optim.SGD: g += wd * p; v = momentum * v + g; p -= lr * v. Element-wise, so done once on all the
        # parameters laid end to end (the same values; a handful of nodes instead of six per parameter).
        flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in (params, state, [grads[name] for name in trainable])]
        new_state = momentum * flat[1] + flat[2] + weight_decay * flat[0]
        new_params = flat[0] - lr * new_state
        sizes = [p.numel() for p in params]
        unflat = [[t.reshape(p.shape) for t, p in zip(torch.split(f, sizes), params)] for f in (new_params, new_state)]
        return (loss, *unflat[0], *unflat[1])

    return step


def make_forward_fn(model: nn.Module, names: Sequence[str]) -> Callable:
    from torch.func import functional_call

    def forward(*args: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, args[:-1])), (args[-1],))

    return forward


# ----------------------------------------------------------------- ONNX
class _Traced(nn.Module):
    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, *args):
        return self.graph(*args)


def _rename(model, old_to_new: dict[str, str]) -> None:
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name in old_to_new:
            value.name = old_to_new[value.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in old_to_new:
                node.input[i] = old_to_new[name]
        for i, name in enumerate(node.output):
            if name in old_to_new:
                node.output[i] = old_to_new[name]


def _relu_masks_as_hard_sigmoid(proto) -> int:
    """Rewrite each ReLU mask ``Ceil(Clip(x, 0, 1))`` (see :func:`_threshold_backward`) as one
    ``HardSigmoid(x, alpha=FLT_MAX, beta=0)`` = ``clamp(FLT_MAX * x, 0, 1)``: 1 for every positive normal x (FLT_MAX
    times the smallest is 4), 0 for x <= 0. One pass instead of two (HardSigmoid runs at the ReLU's speed, 0.24 ms on
    64 x 784 x 32 floats, where Clip + Ceil took 1.0 ms in the step). Only positive subnormals (< 1.2e-38) would get a
    fraction instead of 1. Returns how many were rewritten."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims}
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rewritten, dropped = 0, set()
    for node in graph.node:
        clip = producers.get(node.input[0]) if node.op_type == "Ceil" else None
        if (clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or uses.get(clip.output[0]) != 1
                or constants.get(clip.input[1]) != 0.0 or constants.get(clip.input[2]) != 1.0
                or any(o.name == clip.output[0] for o in graph.output)):
            continue
        hard = onnx.helper.make_node("HardSigmoid", [clip.input[0]], list(node.output), name=node.name,
                                     alpha=float(np.finfo(np.float32).max), beta=0.0)
        node.CopyFrom(hard)
        dropped.add(id(clip))
        rewritten += 1
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return rewritten


def trace_to_onnx(fn: Callable, args: Sequence[torch.Tensor], input_names: Sequence[str], output_names: Sequence[str],
                  batch_inputs: Sequence[int], pixel_major_forward: bool = False) -> bytes:
    """Trace ``fn`` with make_fx, export with the dynamo exporter, name the graph's inputs and outputs.

    ``pixel_major_forward``: convolutions with many input channels as products of pixel-major columns (for a step
    that also takes their weight gradients; see :func:`_decompositions`)."""
    import onnx
    import onnx.inliner
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch.fx.experimental import _config as fx_config

    # No duck sizing: a batch that happens to equal a kernel size (3) must not share its symbol, or the
    # im2col weight gradient's loop over kernel taps would fix the batch along with the kernel.
    with fx_config.patch(use_duck_shape=False):
        graph = make_fx(fn, decomposition_table=_decompositions(pixel_major_forward), tracing_mode="symbolic")(*args)
    _drop_unit_sums(graph)
    graph = _shared_repeats(graph)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if i in batch_inputs else None for i in range(len(args)))
    program = torch.onnx.export(_Traced(graph).eval(), tuple(args), dynamo=True, dynamic_shapes=(dynamic,), verbose=False,
                                optimize=True)
    proto = program.model_proto
    proto = onnx.inliner.inline_local_functions(proto)
    if len(proto.graph.input) != len(input_names) or len(proto.graph.output) != len(output_names):
        raise RuntimeError(
            f"exported graph has {len(proto.graph.input)} inputs / {len(proto.graph.output)} outputs, "
            f"expected {len(input_names)} / {len(output_names)}"
        )
    mapping = {v.name: n for v, n in zip(proto.graph.input, input_names)}
    mapping.update({v.name: n for v, n in zip(proto.graph.output, output_names)})
    _rename(proto, mapping)
    _relu_masks_as_hard_sigmoid(proto)
    del proto.functions[:]
    _strip_metadata(proto)
    domains = {node.domain for node in proto.graph.node} | {op.domain for op in proto.opset_import}
    custom = sorted(d for d in domains if d not in ALLOWED_DOMAINS)
    if custom:
        raise RuntimeError(f"exported graph uses non-standard operator domains {custom}")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def external_constants(model_bytes: bytes, names: Sequence[str]) -> bytes:
    """Turn float32 graph inputs into initializers (constants) whose data the runtime supplies.

    Each becomes an external-data initializer at ``FROZEN_LOCATION`` (a file that never exists), so
    the graph holds no copy of the values and onnxruntime refuses it unless they are supplied
    (``edge.bundle.step_session``)."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    by_name = {v.name: v for v in proto.graph.input}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise ValueError(f"{missing} are not inputs of the graph")
    offset = 0
    for name in names:
        dims = [d.dim_value for d in by_name[name].type.tensor_type.shape.dim]
        if by_name[name].type.tensor_type.elem_type != onnx.TensorProto.FLOAT or not all(dims):
            raise ValueError(f"graph input {name} is not a float32 tensor of static shape")
        tensor = proto.graph.initializer.add()
        tensor.name, tensor.data_type = name, onnx.TensorProto.FLOAT
        tensor.dims.extend(dims)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        length = 4 * int(np.prod(dims))
        for key, value in (("location", FROZEN_LOCATION), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += length
    kept = [v for v in proto.graph.input if v.name not in set(names)]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    return proto.SerializeToString()


def _strip_metadata(proto) -> None:
    """Drop the exporter's per-node stack traces and doc strings: they can triple a graph's size."""
    del proto.metadata_props[:]
    proto.doc_string = ""
    proto.graph.doc_string = ""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


# ----------------------------------------------------------------- export
def in_channels(buffer) -> int:
    return int(buffer.image_shape[0])


def _host_buffer(buffer: Any, storage: str | None, mix: float | None,
                 logit_loss_weight: float | None) -> tuple[Any, str, float, float]:
    """(SyntheticBuffer, image storage, mix, logit loss weight) of what the host holds.

    ``buffer`` is a ``SyntheticBuffer``, a ``DistilledBuffer`` (its ``storage``) or a ``DistilledReplayPlugin``
    (also its ``mix`` and ``logit_loss_weight``); explicit arguments win. A bare buffer is stored as JPEG when it
    holds JPEG codes, else as uint8 grey levels (``meta["pixel_bits"]`` of them, packed)."""
    from replaykit.buffer import SyntheticBuffer

    plugin = buffer if hasattr(buffer, "storage_policy") and hasattr(buffer, "logit_loss_weight") else None
    policy = plugin.storage_policy if plugin is not None else buffer
    held_storage = None
    if not isinstance(policy, SyntheticBuffer) and hasattr(policy, "synthetic") and hasattr(policy, "storage"):
        held_storage = policy.storage
        policy = policy.synthetic
        if policy is None:
            raise ValueError("the host buffer is empty: nothing has been distilled yet")
    if not isinstance(policy, SyntheticBuffer):
        raise TypeError(f"buffer must be a SyntheticBuffer, DistilledBuffer or DistilledReplayPlugin, got {type(buffer).__name__}")
    if storage is None:
        storage = held_storage or ("jpeg" if policy._held_jpeg_codes() is not None else "uint8")
    if mix is None:
        mix = plugin.mix if plugin is not None else 0.0
    if logit_loss_weight is None:
        logit_loss_weight = plugin.logit_loss_weight if plugin is not None else 0.1
    return policy, storage, float(mix), float(logit_loss_weight)


def _replay_tensors(buffer, storage: str, num_classes: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The replay file's tensors, the host buffer's own codes (``SyntheticBuffer._stored_images``: what
    ``nbytes(storage)`` counts), and the manifest entry that says how to decode them."""
    stored = buffer._stored_images(storage).detach().cpu()
    described = buffer.codec(storage).manifest(stored)  # grey-level bits, JPEG header length and quality, as the codec says
    entry: dict[str, Any] = {"count": len(buffer), **{k: described[k] for k in ("pixel_bits", "jpeg_header_bytes", "jpeg_quality")}}
    tensors = {"images": stored.numpy()}
    if num_classes > 256 and not buffer.is_soft:
        raise ValueError(f"hard labels are stored as one byte: at most 256 classes, the model has {num_classes}")
    if buffer.is_soft:
        label_storage = buffer.meta.get("soft_label_storage", "float32")
        soft = buffer.labels.detach().float()
        tensors["labels"] = F.pad(soft, (0, num_classes - soft.shape[1])).numpy().astype(label_storage)
        tensors["class_ids"] = buffer.class_ids.numpy().astype(np.uint8)
    else:
        label_storage = "hard"
        tensors["labels"] = buffer.labels.numpy().astype(np.uint8)
    entry["label_storage"] = label_storage
    entry["held_logits"] = buffer.logits is not None
    if buffer.logits is not None:
        from replaykit.buffer import quantize_logits

        if buffer.logits.shape[1] != num_classes:
            raise ValueError(f"the buffer holds logits over {buffer.logits.shape[1]} classes, the model has {num_classes} outputs")
        levels, scales = quantize_logits(buffer.logits)
        tensors["logits"], tensors["logit_scales"] = levels.numpy(), scales.numpy()
    entry["host_nbytes"] = int(buffer.nbytes(storage))
    entry["stored_bytes"] = int(sum(t.nbytes for t in tensors.values()))
    return tensors, entry


def export(
    model: nn.Module,
    buffer,
    out_dir: str | Path,
    *,
    mode: str = "head",
    storage: str | None = None,
    weights: str = "float32",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    class_names: Sequence[str] | None = None,
    verify: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    mix: float | None = None,
    logit_loss_weight: float | None = None,
) -> Path:
    """Write an edge bundle for ``model`` and its replay ``buffer`` into ``out_dir``.

    ``mode="head"`` freezes ``model.features`` and trains ``model.classifier``;
    ``mode="full"`` trains every parameter. The model's output size fixes the
    classes a device may learn: it may learn classes the buffer lacks as long as
    the classifier has an output for them (export a model with spare outputs to
    leave room for new classes). The bundle is built in a temporary folder and
    moved into place only after its graphs matched PyTorch.

    ``buffer`` is a ``SyntheticBuffer``, or the host's ``DistilledBuffer`` / ``DistilledReplayPlugin``. The
    bundle's ``replay.safetensors`` holds it as the host does: ``storage`` (default: the host's own, see
    :func:`_host_buffer`) is ``jpeg`` (the held codes, one shared header), ``uint8`` (grey levels, packed when
    ``meta["pixel_bits"] < 8``), ``float16`` or ``float32``, at the stored resolution (a buffer with a decoder,
    ``meta["decoder"]``, is upsampled on the device); labels one byte each; held logits (``buffer.logits``)
    as int8 + float16 row scales. So the file is ``buffer.nbytes(storage)`` plus its safetensors header.
    The device step replays the held logits DER-style with ``logit_loss_weight`` (the host plugin's, 0.1 by
    default) and shows a share ``mix`` of every mini-batch through the buffer's codec (the plugin's ``mix``;
    0 for a bare buffer), as the host plugin does. ``weights`` is the parameters' storage (``float32``,
    ``float16`` or per-channel ``int8``, see :mod:`edge.codec`): the device dequantizes them to float32 when
    it opens the bundle, and the graphs are verified against PyTorch from those dequantized values.
    """
    buffer, storage, mix, logit_loss_weight = _host_buffer(buffer, storage, mix, logit_loss_weight)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if weights not in WEIGHT_STORAGES:
        raise ValueError(f"weights must be one of {WEIGHT_STORAGES}, got {weights!r}")
    model, buffer = _host_copies(model, buffer)
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix!r}")
    if not (np.isfinite(logit_loss_weight) and logit_loss_weight >= 0):
        raise ValueError(f"logit_loss_weight must be a finite number >= 0, got {logit_loss_weight!r}")
    if storage == "jpeg" and in_channels(buffer) not in (1, 3):
        raise ValueError(f"JPEG storage holds 1 or 3 channels, the buffer has {in_channels(buffer)}")
    if not hasattr(model, "classifier") or not isinstance(model.classifier, nn.Linear) or not hasattr(model, "features"):
        raise ValueError("model must have .features and a linear .classifier (a replaykit.networks network)")
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    num_classes = int(model.classifier.out_features)
    in_shape = tuple(int(s) for s in buffer.decoded_shape)
    model_shape = tuple(getattr(model, "in_shape", in_shape))
    if model_shape != in_shape:
        raise ValueError(f"buffer images decode to {in_shape} but the model expects {model_shape}")
    decoder = buffer.meta.get("decoder")
    if decoder is not None:
        decoder = codecs.decoder_meta(buffer.decoder_factor)  # the codec layer's own entry, rebuilt from the checked factor
        decoder_factor(decoder)  # the device's own check of what it will be given
    if len(buffer) == 0:
        raise ValueError("the buffer is empty; a bundle needs replay images")
    if buffer.num_classes > num_classes or (buffer.classes and max(buffer.classes) >= num_classes):
        raise ValueError(f"buffer has classes up to {max(buffer.classes)} but the model has {num_classes} outputs")
    meta = buffer.meta or {}
    channels = in_shape[0]
    mean = [float(v) for v in meta.get("mean", [0.0] * channels)]
    std = [float(v) for v in meta.get("std", [1.0] * channels)]
    names_meta = list(class_names) if class_names is not None else list(meta.get("class_names", []))
    if len(names_meta) < num_classes:
        names_meta = names_meta + [str(i) for i in range(len(names_meta), num_classes)]
    names_meta = names_meta[:num_classes]

    model = model.eval()
    named = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"models with buffers (e.g. BatchNorm running stats: {buffers[:3]}) are not supported; use norm='instance'")
    names = list(named)
    trainable = [n for n in names if n.startswith("classifier.")] if mode == "head" else names
    frozen = [n for n in names if n not in trainable]

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        example_x = torch.randn(3, *in_shape)
        example_t = torch.softmax(torch.randn(3, num_classes), dim=1)
    example_w = list(mean_weights(3))
    scalars = [torch.tensor(lr, dtype=torch.float32), torch.tensor(momentum, dtype=torch.float32),
               torch.tensor(weight_decay, dtype=torch.float32)]
    state = [torch.zeros_like(named[n]) for n in trainable]
    step_args = [named[n] for n in frozen] + [named[n] for n in trainable] + state + [example_x, example_t] + example_w + scalars
    step_inputs = ([PARAM_PREFIX + n for n in frozen] + [PARAM_PREFIX + n for n in trainable]
                   + [STATE_PREFIX + n for n in trainable]
                   + ["x", "targets", "ce_weight", "logit_weight", "lr", "momentum", "weight_decay"])
    step_outputs = ["loss"] + ["new." + PARAM_PREFIX + n for n in trainable] + ["new." + STATE_PREFIX + n for n in trainable]
    nb = len(frozen) + 2 * len(trainable)
    step_fn = make_step_fn(model, frozen, trainable)
    forward_fn = make_forward_fn(model, names)

    model_bytes = trace_to_onnx(forward_fn, [named[n] for n in names] + [example_x],
                                [PARAM_PREFIX + n for n in names] + ["x"], ["logits"], [len(names)])
    step_bytes = trace_to_onnx(step_fn, step_args, step_inputs, step_outputs, [nb, nb + 1, nb + 2, nb + 3],
                               pixel_major_forward=mode == "full")
    if frozen:
        # Head mode: the device never changes the feature extractor, so its parameters become constants
        # of the step graph (onnxruntime pre-packs them: faster steps, measured in benchmarks/log/JOURNAL.md under
        # "head-mode step graph with the frozen feature extractor as constants"); their values stay in
        # buffer.safetensors only and the runtime supplies them.
        constants = [PARAM_PREFIX + n for n in frozen]
        step_bytes = external_constants(step_bytes, constants)
        step_inputs = [name for name in step_inputs if name not in constants]

    # Momentum starts at zero: it is not stored until the device saves (manifest "optimizer_state").
    tensors, param_storage = encode_parameters({n: named[n].numpy() for n in names}, weights, PARAM_PREFIX)
    replay_tensors, replay = _replay_tensors(buffer, storage, num_classes)
    replay.update(mix=mix if has_view(storage, buffer.decoder_factor) else 0.0, logit_loss_weight=logit_loss_weight)

    # Build next to the target so the final rename stays on one filesystem.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        atomic_write_bytes(tmp_dir / MODEL, model_bytes)
        atomic_write_bytes(tmp_dir / TRAIN_STEP, step_bytes)
        write_tensors(tmp_dir / BUFFER, tensors)
        write_tensors(tmp_dir / REPLAY, replay_tensors)
        manifest: dict[str, Any] = {
            "format": "replaykit-edge-bundle",
            "format_version": FORMAT_VERSION,
            "input_shape": list(in_shape),
            "num_classes": num_classes,
            "class_names": names_meta,
            "buffer_classes": sorted(int(c) for c in buffer.classes),
            "buffer_size": len(buffer),
            "soft_labels": bool(buffer.is_soft),
            "image_storage": storage,
            "buffer_image_shape": list(buffer.image_shape),
            "decoder": decoder,
            "replay": replay,
            "weight_storage": weights,
            "param_storage": param_storage,
            "optimizer_state": "zero",
            "mean": mean,
            "std": std,
            "mode": mode,
            "params": {n: list(named[n].shape) for n in names},
            "trainable": trainable,
            "frozen": frozen,
            "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay},
            "loss": "replay_loss",
            "network": _network_spec(model),
            "train_step_inputs": step_inputs,
            "train_step_outputs": step_outputs,
            "activation_floats_per_sample": _activation_floats(model, in_shape),
            "dataset": meta.get("dataset"),
            "distill_method": meta.get("method"),
            "saves": 0,
            "files": {},
        }
        manifest["files"] = {name: file_entry(tmp_dir / name) for name in (MODEL, TRAIN_STEP, BUFFER, REPLAY)}
        manifest = write_manifest(tmp_dir / MANIFEST, manifest)
        if verify:
            errors = verify_bundle(model, tmp_dir)
            worst = max(errors.values())
            if not worst <= 1e-4:
                raise RuntimeError(f"exported graphs disagree with PyTorch (max abs error {worst:.2e}): {errors}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _host_copies(model: nn.Module, buffer):
    """``model`` and ``buffer`` on the CPU, where export traces and verifies: a model or buffer elsewhere (a GPU)
    is copied, so the caller's objects never move; ones already on the CPU are used as they are."""
    import copy

    from replaykit.buffer import SyntheticBuffer

    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).cpu()
    tensors = (buffer.images, buffer.labels, buffer.class_ids, buffer.logits)
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        buffer = SyntheticBuffer(buffer.images.cpu(), buffer.labels.cpu(), buffer.num_classes, buffer.class_ids.cpu(),
                                 buffer.meta, None if buffer.logits is None else buffer.logits.cpu())
    return model, buffer


def _network_spec(model: nn.Module) -> dict[str, Any]:
    spec: dict[str, Any] = {"class": type(model).__name__}
    for key in ("width", "depth", "norm", "embedding_dim"):
        if hasattr(model, key):
            spec[key] = getattr(model, key)
    return spec


def _activation_floats(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Floats of every module output for one sample: the device's memory planner scales it by batch size."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        for h in handles:
            h.remove()
    return int(total + int(np.prod(in_shape)))


# ----------------------------------------------------------------- verification
def torch_step(model: nn.Module, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], x: torch.Tensor,
               targets: torch.Tensor, lr: float, momentum: float, weight_decay: float, trainable: Sequence[str],
               ce_weight: torch.Tensor | None = None, logit_weight: torch.Tensor | None = None):
    """The reference step in PyTorch eager (autograd + the torch.optim.SGD update rule); without weights
    the loss is the batch mean of :func:`soft_cross_entropy`, else :func:`replay_loss`."""
    from torch.func import functional_call

    leaves = {n: p.detach().clone().requires_grad_(n in trainable) for n, p in params.items()}
    logits = functional_call(model, leaves, (x,))
    if ce_weight is None and logit_weight is None:
        loss = soft_cross_entropy(logits, targets)
    else:
        loss = replay_loss(logits, targets, ce_weight, logit_weight)
    grads = torch.autograd.grad(loss, [leaves[n] for n in trainable])
    new_params, new_state = dict(params), dict(state)
    with torch.no_grad():
        for n, g in zip(trainable, grads):
            v = momentum * state[n] + g + weight_decay * params[n]
            new_state[n] = v
            new_params[n] = params[n] - lr * v
    return float(loss.detach()), new_params, new_state


def verify_bundle(model: nn.Module, bundle_dir: str | Path, steps: int = 3, batch: int = 5, seed: int = 0) -> dict[str, float]:
    """Largest absolute difference, ONNX vs PyTorch, per output: logits, loss, and every trainable parameter and
    its momentum (``state.<name>``) over ``steps`` steps, each step taken by both sides from PyTorch's state.

    Both sides start from the parameters as the device opens them (dequantized from the bundle's
    weight storage); ``model`` gives the architecture. Every step starts the graph from PyTorch's
    parameters and momentum: a trajectory compared over many steps would be a float race (a ReLU
    input within round-off of zero can go either way on a given CPU's kernels and move every later
    step), while one step from the same state is what the graph promises."""
    import onnxruntime as ort
    from torch.func import functional_call

    from .bundle import load_tensors, open_parameters

    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    tensors = load_tensors(bundle_dir)
    names, trainable = list(manifest["params"]), manifest["trainable"]
    opt = manifest["optimizer"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *manifest["input_shape"], generator=gen)
    targets = torch.softmax(torch.randn(batch, manifest["num_classes"], generator=gen), dim=1)
    # The last rows replay logits (DER-style term), the others are labelled: both terms of the step are checked.
    held = max(1, batch // 3) if batch > 1 else 0
    targets[batch - held:] = 3 * torch.randn(held, manifest["num_classes"], generator=gen)
    ce_weight = torch.cat([torch.full((batch - held,), 1.0 / (batch - held)), torch.zeros(held)])
    logit_weight = torch.cat([torch.zeros(batch - held), torch.full((held,), 0.1 / (max(held, 1) * manifest["num_classes"]))])
    opened, opened_state = open_parameters(bundle_dir, manifest, tensors)
    params = {n: torch.from_numpy(opened[n].copy()) for n in names}
    state = {n: torch.from_numpy(opened_state[n].copy()) for n in trainable}
    errors: dict[str, float] = {}

    infer = ort.InferenceSession(str(bundle_dir / MODEL), providers=["CPUExecutionProvider"])
    feeds = {PARAM_PREFIX + n: opened[n] for n in names}
    logits = infer.run(["logits"], {**feeds, "x": x.numpy()})[0]
    with torch.no_grad():
        ref_logits = functional_call(model, params, (x,))
    errors["logits"] = float(np.abs(logits - ref_logits.numpy()).max())

    step = step_session(bundle_dir, manifest, opened)
    scalars = {k: np.array(opt[k], dtype=np.float32) for k in ("lr", "momentum", "weight_decay")}
    for _ in range(steps):
        feed = {PARAM_PREFIX + n: params[n].numpy() for n in names if PARAM_PREFIX + n in manifest["train_step_inputs"]}
        feed.update({STATE_PREFIX + n: state[n].numpy() for n in trainable})
        feed.update({"x": x.numpy(), "targets": targets.numpy(), "ce_weight": ce_weight.numpy(),
                     "logit_weight": logit_weight.numpy(), **scalars})
        out = dict(zip(manifest["train_step_outputs"], step.run(manifest["train_step_outputs"], feed)))
        loss, params, state = torch_step(model, params, state, x, targets, opt["lr"], opt["momentum"], opt["weight_decay"], trainable,
                                         ce_weight, logit_weight)
        errors["loss"] = max(errors.get("loss", 0.0), abs(float(out["loss"]) - loss))
        for n in trainable:
            errors[n] = max(errors.get(n, 0.0), float(np.abs(out["new." + PARAM_PREFIX + n] - params[n].numpy()).max()))
            # The momentum moves the parameter by lr times itself: compared in the parameter's units.
            errors[STATE_PREFIX + n] = max(errors.get(STATE_PREFIX + n, 0.0), float(opt["lr"]) * float(
                np.abs(out["new." + STATE_PREFIX + n] - state[n].numpy()).max()))
    return errors
