"""Serving a model directory: the interactive chat console, and an OpenAI-compatible HTTP server whose scheduler
lets requests join and leave the running batch at every decode step (``onnxpipe serve``)."""
