"""Triton kernels (smoothq.runtime.kernels) against smoothq.core.quant and the emulated backend, bit for bit.

Without a GPU, every kernel runs under the Triton interpreter on CPU tensors: tests/conftest.py
sets TRITON_INTERPRET=1 before anything can import Triton in compiled mode (Triton decides at its
first import; see smoothq/runtime/kernels/__init__.py). With a GPU the same tests run the compiled
kernels on CUDA, and the `gpu`-marked ones add Llama-sized shapes. Shapes are small: the
interpreter is slow.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import smoothq as sq  # noqa: E402
import smoothq.runtime.kernels as K  # noqa: E402
from smoothq.core.quant import MIN_SCALE, quantize_activation  # noqa: E402
from smoothq.runtime import backends  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if not K.AVAILABLE:
    pytest.fail(f"Triton is installed but its kernels cannot run: {K._UNAVAILABLE}", pytrace=False)


DEV = "cpu" if K.INTERPRET else "cuda"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOATS = [torch.float16, torch.bfloat16, torch.float32]
# The interpreter's GEMM tile is 16 x 16 x 32 (skinny: 16-column blocks): K = 70 and N = 33 leave
# ragged tails. M = 1, 5, 16 take the decode (split-K) kernel; 17 and 33 the tiled one.
GEMM_SHAPES = [(1, 70, 33), (5, 64, 48), (16, 100, 17), (17, 70, 33), (33, 96, 64)]


def int8(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8).to(DEV)


def exact_acc(a, b):
    return (a.cpu().long() @ b.cpu().long().t()).int()


# ---------------------------------------------------------------- GEMM: integer accumulation


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm_int32_accumulation_is_exact(m, k, n):
    a, b = int8(m, k), int8(n, k, seed=1)
    assert torch.equal(K.int8_gemm(a, b, out_dtype=torch.int32).cpu(), exact_acc(a, b))


def test_gemm_extreme_values_and_strided_operands():
    # All +-127: the largest partial sums. A row-sliced A (row stride 2K) is read in place.
    a = torch.full((40, 2 * 96), 127, dtype=torch.int8, device=DEV)[:, :96]
    b = torch.full((24, 96), -127, dtype=torch.int8, device=DEV)
    b[::2] = 127
    for rows in (3, 40):  # decode and tiled kernels
        assert torch.equal(K.int8_gemm(a[:rows], b, out_dtype=torch.int32).cpu(), exact_acc(a[:rows], b))


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_decode_split_k_is_exact(m, split_k):
    # K = 100 is 4 tiles of 32; split_k = 8 leaves splits with no tile at all (they add zeros).
    a, b = int8(m, 100, seed=2), int8(40, 100, seed=3)
    out = K.int8_gemm(a, b, out_dtype=torch.int32, split_k=split_k)
    assert torch.equal(out.cpu(), exact_acc(a, b))
    x_scale, w_scale = torch.rand(m, 1, device=DEV) / 100, torch.rand(40, 1, device=DEV) / 100
    scaled = K.int8_gemm(a, b, x_scale, w_scale, None, torch.float32, split_k=split_k)
    assert torch.equal(scaled, backends.emulated_linear(a, x_scale, b, w_scale, None, torch.float32))


def test_autotuning_prunes_tiles_by_token_bucket():
    from smoothq.runtime.kernels.gemm import GPU_CONFIGS, _prune

    def heights(m_bucket):
        return {c.kwargs["BLOCK_M"] for c in _prune(GPU_CONFIGS, {"M_BUCKET": m_bucket})}

    assert heights(32) == {32, 64} and heights(128) == {32, 64, 128} and heights(8192) == {64, 128, 256}


def test_split_k_choice_is_shape_based():
    from smoothq.runtime.kernels.skinny_gemm import pick_split_k

    cpu = torch.device("cpu")  # the interpreter assumes an H100's 132 SMs
    assert pick_split_k(4096, 4096, cpu) == 4 and pick_split_k(4096, 11008, cpu) == 4
    assert pick_split_k(22016, 4096, cpu) == 1 and pick_split_k(4096, 256, cpu) == 1


# ---------------------------------------------------------------- GEMM: scaled output


@pytest.mark.parametrize("m,k,n", [(1, 70, 33), (19, 70, 33)])
@pytest.mark.parametrize("per_token,per_channel", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_linear_matches_emulated_backend_bit_for_bit(m, k, n, per_token, per_channel, bias_dtype, out_dtype):
    # |acc| < 2^24 at this K, so emulated's fp32 matmul is exact; the epilogue is the same fp32
    # (acc * x_scale) * w_scale + bias, one rounding to out_dtype: the results must be identical.
    x_q, w_q = int8(m, k, seed=4), int8(n, k, seed=5)
    gen = torch.Generator().manual_seed(6)
    x_scale = (torch.rand(m, 1, generator=gen) / 100 if per_token else torch.tensor([0.013])).to(DEV)
    w_scale = (torch.rand(n, 1, generator=gen) / 100 if per_channel else torch.tensor([0.021])).to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV, bias_dtype) if bias_dtype else None
    out = K.triton_int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    ref = backends.emulated_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert torch.equal(out, ref)


def test_gemm_rejects_bad_operands():
    a, b, one = int8(4, 32), int8(8, 32), torch.ones(1, device=DEV)
    with pytest.raises(ValueError, match="int8"):
        K.int8_gemm(a.float(), b, one, one)
    with pytest.raises(ValueError, match="b_scale"):
        K.int8_gemm(a, b, one, torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="raw int32"):
        K.int8_gemm(a, b, None, None, None, torch.float16)
    assert K.int8_gemm(a[:0], b, one, one).shape == (0, 8)


def test_prepack_weight_keeps_the_layout():
    w = int8(8, 32)
    assert K.prepack_weight(w) is w
    packed = K.prepack_weight(w.t().contiguous().t())  # column-major in, row-major [N, K] out
    assert packed.is_contiguous() and torch.equal(packed, w)


# ---------------------------------------------------------------- activation quantization


def activations(shape, dtype, seed=7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    x[..., 0] *= 40  # an outlier channel, as SmoothQuant expects
    x = x.reshape(-1, shape[-1])
    if x.shape[0] > 2:
        x[1] = 0  # all-zero row: MIN_SCALE, all-zero codes
        x[2, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # scale 1: exact ties round to even
        x[2, 6:] = x[2, 6:].clamp(-100, 100)
    return x.reshape(shape).to(DEV, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (2, 3, 48)])
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor_dynamic", "per_tensor_static"])
@pytest.mark.parametrize("block_k", [None, 32])  # 32: several chunks per row, a masked tail
def test_activation_quantization_is_bit_identical(dtype, shape, granularity, block_k):
    x = activations(shape, dtype)
    static = torch.tensor([0.037], device=DEV) if granularity == "per_tensor_static" else None
    ref_q, ref_s = quantize_activation(x, granularity, static)
    if granularity == "per_token":
        q, s = K.quantize_per_token(x, block_k=block_k)
    elif granularity == "per_tensor_dynamic":
        q, s = K.quantize_per_tensor_dynamic(x, block_k=block_k)
    else:
        q, s = K.quantize_per_tensor_static(x, static, block_k=block_k), static
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == ref_s.shape
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    assert q.min() >= -127


def test_quantize_handles_ties_zero_rows_and_sliced_rows():
    x = activations((5, 64), torch.float32)
    q, s = K.quantize_per_token(x)
    assert q[2, :6].tolist() == [127, 0, 2, 2, 0, -2]  # round half to even
    assert s[1].item() == pytest.approx(MIN_SCALE) and not q[1].any()
    wide = torch.randn(4, 96, device=DEV)[:, 16:80]  # row stride 96, read in place
    ours, ref = K.quantize_per_token(wide), quantize_activation(wide, "per_token")
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_triton_quantize_activation_has_the_quant_contract():
    x = activations((6, 40), torch.bfloat16)
    static = torch.tensor([0.05], device=DEV)
    for g in ("per_token", "per_tensor_dynamic", "per_tensor_static"):
        q, s = K.triton_quantize_activation(x, g, static)
        ref_q, ref_s = quantize_activation(x, g, static)
        assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    assert K.triton_quantize_activation(x, "per_tensor_static", static)[1] is static
    with pytest.raises(ValueError, match="static scale"):
        K.triton_quantize_activation(x, "per_tensor_static")
    with pytest.raises(ValueError, match="granularity"):
        K.triton_quantize_activation(x, "per_channel")


def test_quantize_then_gemm_is_the_w8a8_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40).to(DEV)
    x = torch.randn(3, 7, 96, device=DEV)
    import smoothq as sq

    ref = sq.W8A8Linear.from_float(lin, sq.W8A8, backend="emulated")
    x_q, x_s = K.triton_quantize_activation(x.reshape(-1, 96), "per_token")
    out = K.triton_int8_linear(x_q, x_s, K.prepack_weight(ref.weight), ref.weight_scale, ref.bias, x.dtype)
    assert torch.equal(out.reshape(3, 7, 40), ref(x))


# ---------------------------------------------------------------- norm + quantization


def hf_rmsnorm(x, w, eps, offset):
    """Gemma-style HF RMSNorm: fp32 throughout, one cast to the input dtype at the end."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + w.float())).to(x.dtype)


def hf_layernorm(x, w, b, eps):
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), None if b is None else b.float(), eps).to(x.dtype)


def norm_weights(k, dtype, seed=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(k, generator=gen) + 0.5).to(DEV, dtype), (torch.randn(k, generator=gen) / 10).to(DEV, dtype)


def signs(m, k, seed=9):
    """Rows of +-1 with zero mean: mean(x^2) = var = 1, so with eps = 3 the rsqrt is exactly 0.5 and
    the normalized row is exactly representable whatever the order of the sums."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.ones(m, k)
    x[:, k // 2 :] = -1
    return x[:, torch.randperm(k, generator=gen)].to(DEV)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("static", [False, True])
def test_rmsnorm_quantize_is_exact_where_the_norm_is(dtype, offset, static):
    x = signs(5, 96).to(dtype)
    w, _ = norm_weights(96, dtype)
    scale = torch.tensor([0.011], device=DEV) if static else None
    ref_q, ref_s = quantize_activation(
        hf_rmsnorm(x, w, 3.0, offset), "per_tensor_static" if static else "per_token", scale
    )
    q, s = K.rmsnorm_quantize(x, w, 3.0, offset, scale, block_k=32)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_layernorm_quantize_is_exact_where_the_norm_is(dtype, has_bias, static):
    x = signs(5, 96).to(dtype)
    w, b = norm_weights(96, dtype)
    b = b if has_bias else None
    scale = torch.tensor([0.011], device=DEV) if static else None
    y = ((x.float() * 0.5) * w.float() + (0 if b is None else b.float())).to(dtype)  # mean 0, rstd 0.5
    ref_q, ref_s = quantize_activation(y, "per_tensor_static" if static else "per_token", scale)
    q, s = K.layernorm_quantize(x, w, b, 3.0, scale, block_k=32)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)


# Random rows: the kernel reduces sums in a different order than torch, and torch's vectorized CPU
# rsqrt is not correctly rounded (up to 2 ulp off; the kernel's 1 / sqrt is), so a normalized value
# can land on the other side of a rounding boundary. Measured under the interpreter (these inputs,
# 512 x 4096, fp16 / bf16 / fp32): 0 to 1 codes in 2,097,152 differ, by exactly 1; fp32 scales
# differ by <= 1 ulp in a few rows, fp16/bf16 scales not at all; the 64 x 200 cases below: none.
# On GPUs torch's rsqrt is approximate too. Bound: |diff| <= 1 on at most 0.1% of codes.
MAX_OFF_BY_ONE = 1e-3


def assert_off_by_one_at_most(q, ref_q, s, ref_s, dtype):
    diff = (q.int() - ref_q.int()).abs()
    assert diff.max() <= 1 and diff.bool().float().mean() <= MAX_OFF_BY_ONE
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(s, ref_s, rtol=tol, atol=0)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_quantize_random_rows(dtype, offset):
    x = activations((64, 200), dtype, seed=10)
    w, _ = norm_weights(200, dtype, seed=11)
    ref_q, ref_s = quantize_activation(hf_rmsnorm(x, w, 1e-6, offset), "per_token")
    q, s = K.rmsnorm_quantize(x, w, 1e-6, offset)
    assert_off_by_one_at_most(q, ref_q, s, ref_s, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_layernorm_quantize_random_rows(dtype):
    x = activations((64, 200), dtype, seed=12) + 0.5
    w, b = norm_weights(200, dtype, seed=13)
    ref_q, ref_s = quantize_activation(hf_layernorm(x, w, b, 1e-5), "per_token")
    q, s = K.layernorm_quantize(x, w, b, 1e-5)
    assert_off_by_one_at_most(q, ref_q, s, ref_s, dtype)
    static = torch.tensor([0.02], device=DEV)
    q, s = K.layernorm_quantize(x, w, b, 1e-5, static)
    ref_q, _ = quantize_activation(hf_layernorm(x, w, b, 1e-5), "per_tensor_static", static)
    assert s is static and (q.int() - ref_q.int()).abs().max() <= 1


def test_norm_quantize_keeps_leading_dims():
    x = activations((2, 3, 64), torch.float16)
    w, _ = norm_weights(64, torch.float16)
    q, s = K.rmsnorm_quantize(x, w, 1e-6)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 1)


# ---------------------------------------------------------------- compiled code, without a GPU


def test_kernels_compile_for_hopper_as_intended():
    """Compile every kernel for sm_90 (Triton's own LLVM + bundled ptxas, no GPU needed) and check
    the PTX: int8 wgmma in the tiled GEMM, IEEE division and the kept round-half-even add in the
    quantizers, no FMA in the epilogues. Runs in a subprocess: this process interprets."""
    pytest.importorskip("triton.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "smoothq.runtime.kernels.aot", "--target", "cuda:90"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wgmma_s8" in proc.stdout


# ---------------------------------------------------------------- no Triton


def test_import_without_triton_fails_only_when_called():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import smoothq.runtime.kernels as K\n"
        "assert not K.HAVE_TRITON and not K.AVAILABLE\n"
        "try:\n    K.quantize_per_token(None)\nexcept RuntimeError as e:\n    assert 'needs Triton' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- GPU: Llama-sized shapes


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 1024])
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (4096, 11008 + 8)])
def test_cuda_gemm_large_shapes(m, k, n):
    a, b = int8(m, k, seed=20), int8(n, k, seed=21)
    acc = K.int8_gemm(a, b, out_dtype=torch.int32)
    # cuBLASLt's exact int8 GEMM as the reference; it needs M > 16, so pad with zero rows
    ref = torch._int_mm(torch.cat([a, a.new_zeros(max(0, 17 - m), k)]), b.t())[:m]
    assert torch.equal(acc, ref)
    x_scale, w_scale = torch.rand(m, 1, device="cuda") / 100, torch.rand(n, 1, device="cuda") / 100
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for dtype in FLOATS:
        out = K.triton_int8_linear(a, x_scale, b, w_scale, bias, dtype)
        # the eager epilogue on the exact accumulator: no FMA contraction in the kernel, so equal bits
        assert torch.equal(out, ((ref.float() * x_scale) * w_scale.reshape(1, -1) + bias.float()).to(dtype))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_quantization_large_shapes(dtype):
    x = torch.randn(2048, 11008, device="cuda", dtype=dtype) * 4
    for g in ("per_token", "per_tensor_dynamic"):
        q, s = K.triton_quantize_activation(x, g)
        ref_q, ref_s = quantize_activation(x, g)
        assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    w = torch.rand(11008, device="cuda", dtype=dtype) + 0.5
    q, s = K.rmsnorm_quantize(x, w, 1e-6)
    ref_q, ref_s = quantize_activation(hf_rmsnorm(x, w, 1e-6, 0.0), "per_token")
    assert_off_by_one_at_most(q, ref_q, s, ref_s, dtype)


@gpu
@needs_cuda
def test_cuda_kernels_never_sync_with_the_host():
    x = torch.randn(24, 4096, device="cuda", dtype=torch.float16)
    w_q, w_s = int8(4096, 4096), torch.rand(4096, 1, device="cuda") / 100

    def step(x):
        x_q, x_s = K.triton_quantize_activation(x, "per_token")
        y = K.triton_int8_linear(x_q, x_s, w_q, w_s, None, x.dtype)
        q2, _ = K.triton_quantize_activation(y, "per_tensor_dynamic")
        return K.rmsnorm_quantize(y, torch.ones(4096, device="cuda", dtype=x.dtype), 1e-6)[0], q2

    for rows in (1, 24):
        step(x[:rows])  # autotuning benchmarks (and syncs) on the first call per shape bucket
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows in (1, 24):
            step(x[:rows])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_tiny_llama_on_the_kernels_matches_the_emulated_backend_bit_for_bit():
    """The whole W8A8 model path (fused activation quantization + GEMM) through the kernels."""
    from tiny import sample_ids, tiny_model

    if K.INTERPRET:  # interpreted kernels take CPU tensors: expose them as a CPU backend for this test
        backends.register(
            backends.Backend(
                "triton-interpreted", K.triton_int8_linear, devices=("cpu",), quantize=K.triton_quantize_activation
            )
        )
    name = "triton-interpreted" if K.INTERPRET else "triton"
    try:
        model = tiny_model("llama").to(DEV)
        ids = sample_ids(n=2, length=8).to(DEV)
        stats = sq.calibrate(model, ids, progress=False)
        for scheme in ("W8A8", "O3"):
            ref = sq.quantize(copy.deepcopy(model), scheme, stats, backend="emulated")
            ours = sq.quantize(copy.deepcopy(model), scheme, stats, backend=name)
            with torch.no_grad():
                assert torch.equal(ours(ids).logits, ref(ids).logits), scheme
    finally:
        backends._BACKENDS.pop("triton-interpreted", None)
