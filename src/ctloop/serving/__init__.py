"""The OpenAI-compatible server: backends, shadow router, request and shadow log store, comparison."""
