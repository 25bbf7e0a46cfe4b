import subprocess
import sys

import pytest


@pytest.mark.e2e
def test_demo_shows_a_token_exact_failover() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--tokens", "150"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "admin: http://127.0.0.1:" in out.stdout
    assert "promoted at epoch 2" in out.stdout
    assert "token-exact with an unbroken run: yes" in out.stdout
    assert (
        'failover_supervisor_failovers_total{reason="failover:exit",result="promoted"' in out.stdout
    )
    assert "Traceback" not in out.stderr
