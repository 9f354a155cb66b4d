"""A trained checkpoint at work: scoring new images (Scorer, --score) and the ONNX export (--export)."""
