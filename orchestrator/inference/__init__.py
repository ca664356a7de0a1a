"""Use trained weights: `sdo predict` (detections json + pictures) and `sdo export` (ONNX, torch.export)."""
