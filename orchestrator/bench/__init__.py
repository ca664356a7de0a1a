"""`sdo bench ops|data|train`: benchmarks that print JSON (``flops`` lives in the CLI over model.flops)."""
