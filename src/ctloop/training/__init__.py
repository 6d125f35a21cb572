"""Training a LoRA adapter: the resumable trainer and the tiny base model of the quickstart."""
