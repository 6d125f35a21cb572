"""The base model and tokenizer: loading, encoding and batching records, per-token losses.

Shared by training, evaluation, drift embedding and serving."""
