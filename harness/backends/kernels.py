"""Integer GEMM / convolution kernels for the int8 backend, with exact zero-point handling.

With centred weight codes c (zero point zw per output channel) and activation codes a (zero point za
per tensor), every output is s_a * s_w[o] * sum_k (a_k - za)(c_ok - zw_o). Kernels compute the
integer sum with the fastest real integer path of the device and add the correction terms that
their primitive does not apply itself:

- `IntMMKernel` (torch._int_mm: cuBLAS int8 on CUDA, a oneDNN/VNNI-backed path on x86 CPUs):
  int8 x int8 -> int32, so both zero points are removed by hand:
  sum a'c' - zw sum a' - za' sum c' + K za' zw (a', za' centred). Convolutions go through im2col
  (the input is padded with its zero point, i.e. with the code of 0.0, as the fake conv pads 0.0).
- `OneDNNKernel` (torch.ops.onednn.qconv2d_pointwise / qlinear_pointwise, x86 CPU): uint8
  activations with their zero point and int8 weights in, fp32 out with bias. The primitive assumes
  symmetric weights (it ignores weight zero points), so zw * sum_window(a - za) is subtracted.
"""

from __future__ import annotations

import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from harness.backends.lowering import IntWeight, quantize_codes
from methods.engine.quantizer import ActQuantizer

INT_MM_ALIGN = 8  # cuBLAS int8 GEMM: K and N multiples of 8
INT_MM_MIN_ROWS = 17  # cuBLAS int8 GEMM: M > 16


@dataclass(frozen=True)
class ConvGeometry:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


class IntKernel(ABC):
    """One input-channel group of a layer: fp32 input in, quantized by the group's activation
    quantizer with the given (scale, zero point), integer product, fp32 out (bias included if
    given). `act_offset` re-centres the activation codes to int8."""

    name: ClassVar[str]

    def __init__(self, weight: IntWeight, geometry: ConvGeometry | None, bias: torch.Tensor | None,
                 act: ActQuantizer, act_offset: int) -> None:
        self.geometry = geometry
        self.bias = None if bias is None else bias.detach().float()
        self.act, self.act_qmin, self.act_offset = act, act.qmin, act_offset
        self.out_channels = weight.codes.shape[0]
        self.w_scale = weight.scale.float()
        self.w_zero_point = weight.zero_point

    @abstractmethod
    def __call__(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """`x`: the layer input (this group's channels); (scale, zp): its quantization parameters."""

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, shift: int) -> torch.Tensor:
        return quantize_codes(self.act, x, scale, zp, shift)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, extra]
    return F.pad(t, pad)


class IntMMKernel(IntKernel):
    """torch._int_mm with im2col for convolutions; zero points removed by exact int32 corrections."""

    name = "torch._int_mm"

    def __init__(self, weight: IntWeight, geometry: ConvGeometry | None, bias: torch.Tensor | None,
                 act: ActQuantizer, act_offset: int) -> None:
        super().__init__(weight, geometry, bias, act, act_offset)
        mat = weight.codes.flatten(1)  # (O, K), K ordered (C, kh, kw) like unfold's columns
        self.k = mat.shape[1]
        # (K, O) as a transposed view of a row-major (O, K) matrix: the column-major second operand
        # cuBLASLt's int8 GEMM wants (torchao's convention); the CPU path accepts it as well.
        self.weight_t = _pad_to(_pad_to(mat, 1, INT_MM_ALIGN), 0, INT_MM_ALIGN).contiguous().t()
        self.colsum = mat.to(torch.int32).sum(dim=1)
        self.zw = weight.zero_point.to(torch.int32)

    def _rows(self, a: torch.Tensor, za: float) -> torch.Tensor:
        """Centred codes -> (M, K) matrix: im2col for convolutions (padding with the zero point)."""
        g = self.geometry
        if g is None:
            return a.reshape(-1, a.shape[-1])
        if g.pointwise:
            return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
        (ph, pw) = g.padding
        a = F.pad(a, (pw, pw, ph, ph), value=za) if ph or pw else a
        cols = F.unfold(a, g.kernel_size, dilation=g.dilation, stride=g.stride)
        return cols.transpose(1, 2).reshape(-1, self.k)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        za = int(zp) - self.act_offset
        rows = self._rows(self._codes(x, scale, zp, self.act_offset), float(za)).to(torch.int8)
        m = rows.shape[0]
        a = _pad_to(rows, 1, INT_MM_ALIGN)
        if a.is_cuda and m < INT_MM_MIN_ROWS:
            a = F.pad(a, (0, 0, 0, INT_MM_MIN_ROWS - m))
        acc = torch._int_mm(a, self.weight_t)[:m, : self.out_channels]
        rowsum = rows.sum(dim=1, dtype=torch.int32)
        acc = acc - rowsum[:, None] * self.zw[None, :] - za * self.colsum[None, :] + (self.k * za) * self.zw[None, :]
        y = acc.float() * (scale.float() * self.w_scale)[None, :]
        y = self._finish(y)
        if self.geometry is None:
            return y.reshape(*x.shape[:-1], self.out_channels)
        b, _, h, w = x.shape
        ho, wo = self.geometry.out_size(h, w)
        return y.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2)


class OneDNNKernel(IntKernel):
    """x86 oneDNN int8 convolution / linear with fp32 output (the kernels torch.compile uses for
    int8 on CPU); the weight zero point, which the primitive ignores, is corrected by hand."""

    name = "onednn int8 (torch.ops.onednn.qconv2d_pointwise / qlinear_pointwise)"

    def __init__(self, weight: IntWeight, geometry: ConvGeometry | None, bias: torch.Tensor | None,
                 act: ActQuantizer, act_offset: int) -> None:
        super().__init__(weight, geometry, bias, act, act_offset)
        codes = weight.codes.contiguous()
        self.no_zp = torch.zeros(self.out_channels, dtype=torch.long)
        if geometry is None:
            self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        else:
            g = geometry
            self.packed = torch.ops.onednn.qconv_prepack(
                codes, self.w_scale, 1.0, 0, list(g.stride), list(g.padding), list(g.dilation), 1, None)
            self.ones = torch.ones(1, 1, *g.kernel_size)
        # Per output channel, what the primitive leaves out: -zw * s_w (times s_a * window sum of a - za).
        self.neg_zw_scale = None if weight.symmetric else -weight.zero_point.float() * self.w_scale

    def __call__(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        s, zu = float(scale), int(zp) - self.act_qmin
        u = self._codes(x, scale, zp, self.act_qmin)  # uint8 grid, as float
        g = self.geometry
        if g is None:
            k = x.shape[-1]
            u = u.reshape(-1, k)
            y = torch.ops.onednn.qlinear_pointwise(
                u.to(torch.uint8), s, zu, self.packed, self.w_scale, self.no_zp, self.bias,
                1.0, 0, torch.float32, "none", [], "")
            if self.neg_zw_scale is not None:
                rowsum = u.sum(dim=1, keepdim=True) - k * zu  # sum_k (a - za), exact in fp32
                y.addcmul_(rowsum, self.neg_zw_scale[None, :], value=s)
            return y.reshape(*x.shape[:-1], self.out_channels)
        y = torch.ops.onednn.qconv2d_pointwise(
            u.to(torch.uint8, memory_format=torch.channels_last), s, zu, self.packed, self.w_scale, self.no_zp,
            self.bias, list(g.stride), list(g.padding), list(g.dilation), 1, 1.0, 0, torch.float32, "none", [], "")
        if self.neg_zw_scale is not None:
            centred = u.sum(dim=1, keepdim=True) - x.shape[1] * zu  # sum_c (a - za), exact in fp32
            window = F.conv2d(centred, self.ones, None, g.stride, g.padding, g.dilation)
            y.addcmul_(window, self.neg_zw_scale[None, :, None, None], value=s)
        return y


KERNELS: dict[str, type[IntKernel]] = {"int_mm": IntMMKernel, "onednn": OneDNNKernel}


def onednn_available() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qconv2d_pointwise"))


def select_kernel(name: str, device: torch.device) -> type[IntKernel]:
    """`auto`: cuBLAS int8 (torch._int_mm) on CUDA; oneDNN int8 on x86 CPUs (measured fastest there,
    see harness/bench.py); torch._int_mm elsewhere."""
    if name == "auto":
        if device.type == "cpu" and onednn_available():
            return OneDNNKernel
        return IntMMKernel
    if name not in KERNELS:
        raise ValueError(f"<backend.kernel={name}> is not an int8 kernel; accepted: auto, {', '.join(KERNELS)}")
    if name == "onednn" and (device.type != "cpu" or not onednn_available()):
        raise ValueError(f"<backend.kernel=onednn> needs an x86 CPU with oneDNN; the model is on {device}. "
                         "Use kernel=int_mm or auto")
    return KERNELS[name]
