"""Quantization methods: observers, static activation calibration, SmoothQuant, weight-only
int8/int4, QAT (see the modules).

* ``observers``   scales / zero points (min-max, percentile, MSE; per tensor/channel/token/group;
                  symmetric or asymmetric, 4 or 8 bits), functional and stateful
* ``int4``        the group-wise int4 weight format of the "w4" scheme (two codes per byte)
* ``state``       what calibrate / smooth / gptq leave on a float linear layer
* ``gptq``        GPTQ error-compensating weight quantization for "w4" / "w8" (float weights
                  and scales on the layers; ``replace_linear`` then packs them losslessly)
* ``awq``         AWQ activation-aware input-channel scaling before w4 / w8 (with ``gptq``)
* ``calibrate``   static per-tensor activation scales, symmetric or asymmetric
                  (``pysparse.calibrate``)
* ``smoothquant`` ``pysparse.smooth`` (and the fold machinery AWQ shares)
* ``qat``         ``pysparse.prepare_qat`` / ``pysparse.convert_qat``

This package imports nothing itself (``pysparse.nn.linear`` imports ``int4`` and ``state``, and
``awq`` / ``calibrate`` / ``smoothquant`` / ``qat`` import the replacement pass).
"""
