import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run under the interpreter, which Triton decides at its first
# import (torch._dynamo can import it early); set it before anything else does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("SMOOTHQ_DATA", SHARED_DATA))
    if not (d / "wikitext2-test.txt").is_file():
        pytest.fail(f"shared data not found at {d}: set SMOOTHQ_DATA")
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The real model, loaded once per session (fp32)."""
    import smoothq

    return smoothq.load_model("smollm2")


@pytest.fixture
def int8_cpu(monkeypatch):
    """SMOOTHQ_CPU_INT8=1: the oneDNN fast path runs without int8 dot-product instructions too, where
    its integer sums are exact (cpu_fast.onednn_sums_exact); where they are not (an AVX2-only EPYC:
    saturating 16-bit pair sums), the fast path refuses to run and these tests are skipped."""
    import torch

    from smoothq.runtime import backends

    monkeypatch.setenv("SMOOTHQ_CPU_INT8", "1")
    backends.cpu_int8_accelerated.cache_clear()
    if hasattr(torch.ops.onednn, "qlinear_pointwise"):
        from smoothq.runtime.cpu_fast import onednn_sums_exact

        if not onednn_sums_exact():
            pytest.skip(
                "oneDNN's int8 GEMM gives wrong sums on this CPU (no int8 dot-product instructions): "
                "optimize_for_cpu refuses here"
            )
    yield
    backends.cpu_int8_accelerated.cache_clear()
