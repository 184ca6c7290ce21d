"""pipeline: a recipe run end to end. `run` orders the stages (run), the layered executor quantizes
a model larger than memory one decoder layer at a time (layered), and preflight checks every input
and output of a command before any weights are loaded (preflight).

May import: formats, transforms, runtime, archs, core.
"""
