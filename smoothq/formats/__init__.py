"""formats: what goes to and comes from disk. The smoothq checkpoint, which is also the
compressed-tensors layout vLLM loads (io), its validation (verify), the compressed-tensors transform
config of the online rotation (ct_transforms), streamed shard reading and writing (stream), ONNX
export (onnx) and the vLLM plugin (vllm_plugin).

May import: transforms, runtime, archs, core.
"""
