"""``toolkit serve``: an HTTP server with dynamic batching around one loaded ``atdiff.runtime.Pipeline``.

Needs the ``[serve]`` extra (FastAPI, uvicorn, prometheus-client); ``import atdiff.runtime`` does not import this
package.
"""
