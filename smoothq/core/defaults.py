"""The defaults and choices the command line shows, in a module that imports nothing: `smoothq
--help` builds its parser from them without importing torch (seconds). The modules that use them
import them from here (data, models, bench, inspect, rotate, recipe); backends.names() and
archs.OPTIONS are checked against BACKENDS and SMOOTHING_OPTIONS by a test (backends register
themselves at import; archs is the table's own module)."""

DEFAULT_MODEL = "smollm2"
DEFAULT_CALIB = "wikitext2-train"
DEFAULT_EVAL = "wikitext2"
BOS_PROTOCOLS = ("auto", "window", "stream", "none")
BACKENDS = ("auto", "emulated", "torch", "triton")  # = backends.names()
ROTATIONS = ("hadamard", "orthogonal")  # rotate.KINDS
SMOOTHING_OPTIONS = ("attn_vo", "mlp_updown", "opt_fc")  # = archs.OPTIONS (the recipe checks names against them)
BENCH_CONFIGS = ("fp32", "bf16", "w8a8", "o3")
# smoothq inspect: rows of the kept input sample per linear, enough for stable SQNRs with bounded
# memory (tokens x the sum of the distinct input widths x 4 bytes; SmolLM2-135M at 256: ~100 MB)
INSPECT_TOKENS = 256
INSPECT_HEAT_TOKENS = 128  # tokens of calibration sample 0 in each token x channel map
