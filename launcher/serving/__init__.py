"""The HTTP service of `python -m launcher.serve`: request checking (protocol), the decoding thread that batches
concurrent requests (engine), the FastAPI app (app) and its Prometheus metrics (metrics)."""
