"""Container health check of the API role: GET /healthz on the port the API listens on."""

import os
import sys
import urllib.request

port = os.environ.get("RECS_API__PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
