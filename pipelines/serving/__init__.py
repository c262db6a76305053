"""Serving the registered models: what the register stage logs (``models``: a ``python_function`` model per
registered version, loaded through ``ssl_core.serving`` alone; ``onnx_export``: ONNX copies checked against torch)
and how they are served (``app``: a Ray Serve application that follows a registry alias).
"""
