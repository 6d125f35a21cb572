"""ctloop: continuous training of LLM LoRA adapters.

Read `cycle/declaration.py` first: it declares the stages of a cycle in order; then the stage
functions in `cycle/stages.py`, and `cycle/run.py`, which runs them.
"""

__version__ = "0.2.0"
