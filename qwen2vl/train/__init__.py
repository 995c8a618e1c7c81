"""Training: records -> labelled samples (data.py), packed rows and the loss (packing.py)."""
