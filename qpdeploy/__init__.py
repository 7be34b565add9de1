"""qpdeploy: personalize quantized diffusion UNets by training only quantization scales.

Stages (one folder each): ``qpdeploy`` (quantize, train, artifacts, CLI),
``qpdeploy.exporters`` (ONNX with Q/DQ, TensorRT engines), ``qpdeploy.runtimes``
(backends and the step-aware engine scheduler).

Importing this package is cheap: torch and diffusers load only in the modules that use them.
"""

__version__ = "0.1.0"
