"""A flow launcher: imports the flow once, then forks one process per run, so that tests can
kill -9 a run without paying the imports (about 10 s of CPU) again for every run.

Reads one JSON request per line on stdin: ``{"config": {...}, "log": path, "status": path,
"env": {...}}``. Answers ``started <pid>`` on stdout. The child appends its output to
``log``, runs the flow with ``env`` added to its environment, and writes its exit code to
``status`` when it ends by itself (a killed child leaves no status file).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from gridistill.config import DistillConfig
from gridistill.flows.distill import distill


def run(request: dict) -> int:
    os.environ.update(request.get("env", {}))
    try:
        result = distill(DistillConfig(**request["config"]))
    except BaseException:
        traceback.print_exc()
        return 1
    print(json.dumps(result, default=str))
    return 0


def serve() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = run(request)
            sys.stdout.flush()
            sys.stderr.flush()
            with open(request["status"], "w") as status:
                status.write(str(code))
            os._exit(code)
        print(f"started {pid}", flush=True)


if __name__ == "__main__":
    serve()
