"""Single-device nn.Modules: rope, attention kernels, vision tower, text decoder, the full model."""
