"""The model zoo: pretrained and from-scratch networks."""
