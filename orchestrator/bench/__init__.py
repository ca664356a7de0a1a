"""`sdo bench ops|data|train|model`: benchmarks that print JSON (``flops`` lives in the CLI over model.flops)."""
