"""The support desk's own HTTP routes, served beside Stead's (`App(routers=...)` in worker.py)."""
