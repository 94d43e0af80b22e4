"""``toolkit serve``: an HTTP server with dynamic batching around one loaded ``runtime.Pipeline``.

Needs the ``[serve]`` extra (FastAPI, uvicorn, prometheus-client); ``import runtime`` does not import this package.
"""
