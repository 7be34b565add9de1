"""Runtime stage: backends (ONNX Runtime, TensorRT, torch) and the step-aware engine scheduler."""
