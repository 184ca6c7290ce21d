"""runtime: running an INT8 model. W8A8Linear (linear), the GEMM backends (backends: emulated oracle,
torch, triton) and their Triton kernels (kernels), the CPU fast path on oneDNN (cpu_fast), INT8
attention (attention), the token-position tracker that keeps attention-sink tokens in float (sink)
and the online Hadamard rotation of a linear's input (input_rotation, on the Hadamard matrices of
hadamard).

May import: archs, core.
"""
