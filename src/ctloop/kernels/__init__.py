"""Fused operations for CPU training and evaluation: attention, RMSNorm, rotary, cross-entropy, LoRA.

Each is checked against the model's own operation before it is used."""
