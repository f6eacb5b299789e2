"""Quantization methods: observers, static activation calibration, SmoothQuant, weight-only
int8/int4, QAT (see the modules)."""
