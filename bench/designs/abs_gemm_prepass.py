"""Designs "prepass-triton" and "prepass-overlap" of the abs-GEMM, built from the library's pieces."""

from __future__ import annotations

import torch
import triton

from mas_local.kernels import abs_gemm as ag
from mas_local.kernels.launch import on_device

#: Pieces of R in the "prepass-overlap" design.
OVERLAP_PIECES = 4
_side_streams: dict = {}


def prepass_triton(omega, a, b, alpha: float, precision: str = "accurate") -> None:
    """The library's abs pre-pass, then always the Triton GEMM (the library uses cuBLAS for 16-bit operands)."""
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    with on_device(omega.device):
        for r0, r1 in ag.row_chunks(a.shape[0], (a.shape[1] + b.shape[1]) * a.element_size()):
            aa, bb = ag.abs_copy(a[r0:r1], b[r0:r1])
            ag.launch_gemm(omega, aa.t(), bb, alpha, ag.dot_precision(aa.dtype, precision))


def prepass_overlap(omega, a, b, alpha: float, precision: str = "accurate") -> None:
    """The pre-pass of R-piece i+1 runs on a side stream while the GEMM of piece i runs on the caller's stream.

    The pre-pass is memory-bound and the GEMM compute-bound, so they may share the GPU;
    only the first piece's pre-pass is exposed. Scratch: the abs copies of all of A and B.
    Off CUDA or for small R it is the library's path.
    """
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    rows = a.shape[0]
    if omega.device.type != "cuda" or rows < 2 * 256:
        ag.abs_gemm_acc_(omega, a, b, alpha, precision)
        return
    with on_device(omega.device):
        step = triton.cdiv(triton.cdiv(rows, OVERLAP_PIECES), 256) * 256
        main = torch.cuda.current_stream(omega.device)
        side = _side_streams.get(omega.device)
        if side is None:
            side = _side_streams[omega.device] = torch.cuda.Stream(omega.device)
        side.wait_stream(main)  # the operands are written on the main stream
        pieces = []
        with torch.cuda.stream(side):
            for r0 in range(0, rows, step):
                aa, bb = ag.abs_copy(a[r0 : r0 + step], b[r0 : r0 + step])
                done = torch.cuda.Event()
                done.record(side)
                pieces.append((aa, bb, done))
        for aa, bb, done in pieces:
            main.wait_event(done)
            aa.record_stream(main)  # allocated on the side stream, used on the main one
            bb.record_stream(main)
            ag._accumulate(omega, aa, bb, alpha, precision)
