"""The reference application's worker: `python worker.py` (or `stead worker`)."""

from __future__ import annotations

from stead.worker import main

if __name__ == "__main__":
    main()
