"""Shadow deployment: the champion answers, the challenger gets the same request off the user's
path, and both answers are logged side by side. `store.py` is the log store."""
