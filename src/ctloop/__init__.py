"""ctloop: continuous training of LLM LoRA adapters.

Read `pipeline.py` first: it runs one cycle, calling the stage modules in order.
"""

__version__ = "0.1.0"
