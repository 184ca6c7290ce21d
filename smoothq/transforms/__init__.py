"""transforms: functions on a float model and its statistics, in the order a run applies them:
rotation of the residual stream (rotate), calibration (calibrate), smoothing (smooth), the alpha
search and clipping (search), online rotation of linear inputs (online_rotation), and the swap of
float linears for W8A8Linear (quantize).

May import: runtime, archs, core.
"""
