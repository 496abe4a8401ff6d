"""Launch a test worker script on N local CPU processes with torchrun (gloo), bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def torchrun(script: str, *args: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (relative to the repo) under ``torch.distributed.run``; structpeft is imported
    from this checkout's ``src`` and ``tests`` from its root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone", script]
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
