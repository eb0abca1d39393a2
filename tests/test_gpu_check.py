"""scripts/gpu_check.sh's checks at toy size on the CPU (`--tiny`): the script runs, every row
passes and the table has a row per check. (On a GPU it runs at full size; see the README.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_on_cpu():
    # the scripts' rows are what tests/test_device.py runs under an emulated GPU
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device",
                          "cpu", "--tiny", "--skip", "scripts"], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| ") and "PASS" in ln]
    engine = [r for r in rows if r.startswith("| engine = naive")]
    assert len(engine) == 5 * 2  # 5 layers x (float32, bf16) on the CPU
    assert sum(r.startswith("| car_speed") for r in rows) == 2
    assert sum(r.startswith("| preset alexnet_conv1") for r in rows) == 1
    assert "FAIL" not in res.stdout
