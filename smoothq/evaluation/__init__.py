"""evaluation: measuring a quantized model. Zero-shot tasks such as LAMBADA (tasks), the
lm-evaluation-harness bridge (harness), per-layer diagnostics and the HTML report (inspect, report),
speed and memory (bench) and the paper's comparison grid with smoothq's presets (compare).

May import: pipeline, formats, transforms, runtime, archs, core.
"""
