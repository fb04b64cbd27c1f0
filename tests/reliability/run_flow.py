"""Run the distill flow with a JSON config (argv[1]) in its own process, so tests can kill it.

Prints the flow's result as JSON on the last line.
"""

from __future__ import annotations

import json
import sys

from flows.distill import distill
from gridistill.config import DistillConfig

if __name__ == "__main__":
    result = distill(DistillConfig(**json.loads(sys.argv[1])))
    print(json.dumps(result, default=str))
