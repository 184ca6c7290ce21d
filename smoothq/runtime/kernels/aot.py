"""Compile every kernel for a GPU target on a machine without one, and check the generated PTX.

    TRITON_INTERPRET=0 python -m smoothq.runtime.kernels.aot [--target cuda:90] [--all-configs]

The interpreter checks what the kernels compute, but not that they compile, nor what they compile
to. Triton lowers to PTX and runs its bundled ptxas without a GPU, so this checks, for sm_90:
the tiled GEMM uses int8 wgmma; quantization divides with div.rn (never div.full/approx) and
rounds with the magic-number add, which the compiler kept; the epilogues contain no FMA. With
--all-configs it compiles every autotuning config and prints registers, spills and shared memory
(cuobjdump), which catches a config that no longer fits before anyone tunes on a GPU.
Must run with the interpreter off (tests/test_kernels.py runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from . import act_quant, gemm, norm_quant, skinny_gemm

PTX_FACTS = {
    "wgmma_s8": r"wgmma\.mma_async\S*\.s8",
    "mma_sync_s8": r"mma\.sync\S*\.s8",
    "fma": r"\bfma\.",
    "div_rn": r"div\.rn\.f32",
    "div_inexact": r"div\.(full|approx)",
    "sqrt_rn": r"sqrt\.rn\.f32",
    "rne_magic": r"add\.rn\.f32\s+\S+, \S+, 0f4B400000",
}


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # Autotuner / Heuristics wrappers
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, types: dict, constexprs: dict, target: GPUTarget, num_warps=4, num_stages=3):
    """Compile with the options our launches use; every pointer and integer is assumed divisible by 16,
    as Triton specializes them for the aligned shapes of real models."""
    fn = _jit_fn(kernel)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name not in constexprs and (types[name].startswith("*") or types[name] == "i32")
    }
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False})
    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
        options=options.__dict__,
    )


def ptx_facts(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_FACTS.items()}


GEMM_TYPES = dict(
    a_ptr="*i8",
    b_ptr="*i8",
    c_ptr="*bf16",
    a_scale_ptr="*fp32",
    b_scale_ptr="*fp32",
    bias_ptr="*bf16",
    M="i32",
    N="i32",
    K="i32",
    M_BUCKET="i32",
    stride_am="i32",
    stride_bn="i32",
    stride_cm="i32",
)
SKINNY_TYPES = dict(
    a_ptr="*i8",
    b_ptr="*i8",
    out_ptr="*fp16",
    a_scale_ptr="*fp32",
    b_scale_ptr="*fp32",
    bias_ptr="*fp16",
    M="i32",
    N="i32",
    K="i32",
    stride_am="i32",
    stride_bn="i32",
    stride_om="i32",
)
EPILOGUE = dict(A_PER_ROW=True, B_PER_COL=True, HAS_BIAS=True, OUT_INT32=False)


def kernels(all_configs: bool):
    """(name, kernel, types, constexprs, num_warps, num_stages) for every kernel variant we check."""
    for c in _jit_configs(gemm, all_configs):
        yield (
            f"gemm {c.kwargs} w{c.num_warps} s{c.num_stages}",
            gemm._int8_gemm_kernel,
            GEMM_TYPES,
            dict(EPILOGUE, EVEN_K=True, **c.kwargs),
            c.num_warps,
            c.num_stages,
        )
    c = gemm.GPU_CONFIGS[0]  # the other branches: ragged K, per-tensor scales, fp32 out, int32 out
    per_tensor = dict(A_PER_ROW=False, B_PER_COL=False, HAS_BIAS=False)
    for out, flags in (("*fp32", per_tensor), ("*i32", dict(OUT_INT32=True))):
        yield (
            f"gemm ragged-K out={out} {c.kwargs}",
            gemm._int8_gemm_kernel,
            dict(GEMM_TYPES, c_ptr=out),
            dict(EPILOGUE, EVEN_K=False, **flags, **c.kwargs),
            c.num_warps,
            c.num_stages,
        )
    for c in _jit_configs(skinny_gemm, all_configs):
        for split in (1, 4):
            types = dict(SKINNY_TYPES, out_ptr="*fp16" if split == 1 else "*i32")
            yield (
                f"skinny split{split} {c.kwargs} w{c.num_warps} s{c.num_stages}",
                skinny_gemm._skinny_kernel,
                types,
                dict(EPILOGUE, HAS_BIAS=False, SPLIT_K=split, BLOCK_M=16, EVEN_K=False, **c.kwargs),
                c.num_warps,
                c.num_stages,
            )
    yield (
        "splitk_reduce",
        skinny_gemm._splitk_reduce_kernel,
        dict(
            ws_ptr="*i32",
            out_ptr="*bf16",
            a_scale_ptr="*fp32",
            b_scale_ptr="*fp32",
            bias_ptr="*bf16",
            M="i32",
            N="i32",
            stride_om="i32",
        ),
        dict(EPILOGUE, SPLIT_K=4, BLOCK_M=16, BLOCK_N=256),
        4,
        1,
    )
    q_types = dict(
        x_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32", amax_ptr="*fp32", K="i32", stride_xm="i32", stride_qm="i32"
    )
    for mode in (act_quant.PER_TOKEN, act_quant.STATIC, act_quant.FROM_ABSMAX):
        yield (
            f"quantize mode{mode.value}",
            act_quant._quantize_rows_kernel,
            q_types,
            dict(MODE=mode.value, BLOCK_K=4096),
            8,
            1,
        )
    yield (
        "absmax",
        act_quant._absmax_kernel,
        dict(x_ptr="*fp16", amax_ptr="*fp32", K="i32", stride_xm="i32"),
        dict(BLOCK_K=4096),
        8,
        1,
    )
    n_types = dict(
        x_ptr="*fp16",
        w_ptr="*fp16",
        b_ptr="*fp16",
        q_ptr="*i8",
        scale_ptr="*fp32",
        K="i32",
        stride_xm="i32",
        stride_qm="i32",
        eps="fp32",
        offset="fp32",
    )
    for rms, static in ((True, False), (False, True)):
        yield (
            f"{'rms' if rms else 'layer'}norm static={static}",
            norm_quant._norm_quant_kernel,
            n_types,
            dict(RMS=rms, HAS_BIAS=not rms, STATIC=static, BLOCK_K=4096),
            8,
            1,
        )


def _jit_configs(module, all_configs):
    return module.GPU_CONFIGS if all_configs else module.GPU_CONFIGS[:1]


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)}" if m else "regs=?"


def check(target: GPUTarget, all_configs: bool = False, verbose: bool = True) -> list[str]:
    """Compile everything; return the list of broken expectations (empty = fine)."""
    problems = []
    for name, kernel, types, constexprs, warps, stages in kernels(all_configs):
        compiled = compile_kernel(kernel, types, constexprs, target, warps, stages)
        f = ptx_facts(compiled)
        if verbose:
            usage = resource_usage(compiled) if all_configs else ""
            print(
                f"{name:70s} smem={compiled.metadata.shared:6d} {usage} "
                + " ".join(f"{k}={v}" for k, v in f.items() if v)
            )
        if f["fma"]:
            problems.append(f"{name}: FMA in the PTX (fp fusion should be off)")
        if f["div_inexact"]:
            problems.append(f"{name}: approximate division in the PTX")
        if name.startswith("gemm") and constexprs["BLOCK_M"] >= 64 and target.arch >= 90 and not f["wgmma_s8"]:
            problems.append(f"{name}: no int8 wgmma")
        if (name.startswith("quantize") or "norm" in name) and not (f["div_rn"] and f["rne_magic"]):
            problems.append(f"{name}: IEEE division or the round-half-even add is missing")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 (H100/H200), cuda:80")
    p.add_argument("--all-configs", action="store_true", help="every autotuning config, with registers and spills")
    args = p.parse_args()
    if triton.knobs.runtime.interpret:
        sys.exit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
    backend, arch = args.target.split(":")
    problems = check(GPUTarget(backend, int(arch), 32), args.all_configs)
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
