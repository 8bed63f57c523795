"""bench/gpu.sh, the prepared GPU check, runs end to end in its CPU dry mode (so it cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run():
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["dry"] and set(final) >= {"a_parity", "b_decode_tok_s", "c_speculative"}
    assert all(v["greedy equal"] for v in final["c_speculative"].values())
    assert max(final["a_parity"].values()) < 1e-4
