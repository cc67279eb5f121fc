"""The ONNX artifact: export, contract, parity, variants, adapters for foreign graphs."""
