"""Export stage: quantized base + scale pack -> ONNX graphs with Q/DQ -> TensorRT engines."""
