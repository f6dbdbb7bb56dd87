"""Experimental kernel designs, kept out of the library so the GPU table can time them against it.

The library (``mas_local.kernels``) ships only what ``backend="triton"`` runs. These
are the alternatives measured next to it by ``bench/gpu_table.py --only designs``:

* :mod:`.abs_gemm_fused`: one Triton GEMM with ``tl.abs`` on the loaded tiles (no
  pre-pass; the planning measurements found 1.67× cuBLAS for it);
* :mod:`.abs_gemm_prepass`: the library's abs pre-pass followed by the Triton GEMM
  even for 16-bit operands (``prepass_triton``), and the pre-pass in R-pieces on a
  side stream overlapping cuBLAS on the caller's stream (``prepass_overlap``);
* :mod:`.per_sample_nested`: the per-sample kernel with a T-loop restarted per sample
  (the planning notes' simple kernel) instead of the library's flat loop.

Each function has the signature of the library's entry point for its op.
"""
