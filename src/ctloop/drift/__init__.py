"""Is the new data unlike the reference? Embedders, batch and online detectors, the trigger policy."""
