"""Per-example evaluation of candidate and reference adapters, text metrics, and the gate's decision."""
