"""formats: what goes to and comes from disk. The smoothq checkpoint, which is also the
compressed-tensors layout vLLM loads: saved (io, which also re-exports the rest of the checkpoint
API), loaded (load), its quantization_config (qconfig), its tensors and shards (tensors), checked
before loading (checks) and by `smoothq verify` (verify); the compressed-tensors form of the online
rotation (ct_transforms); streamed shard reading and writing (stream), ONNX export (onnx)
and its run in ONNX Runtime (onnx_runtime), and the vLLM plugin (vllm_plugin).

May import: transforms, runtime, archs, core.
"""
