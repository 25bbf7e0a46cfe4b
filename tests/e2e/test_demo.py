import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from supervisor.testing.cluster import free_port
from supervisor.testing.netns import NetworkNamespace, namespace_unavailable


def demo(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "supervisor", "demo", *args]
    return subprocess.run([*(wrap or []), *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_demo_shows_a_token_exact_failover() -> None:
    # Ports of its own: another run of the demo may hold the defaults on a shared machine.
    out = demo("--tokens", "150", "--port", str(free_port()), "--admin-port", str(free_port()))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "admin: http://127.0.0.1:" in out.stdout
    assert "promoted at epoch 2" in out.stdout
    assert "token-exact with an unbroken run: yes" in out.stdout
    assert (
        'failover_supervisor_failovers_total{reason="failover:exit",result="promoted"' in out.stdout
    )
    assert "Traceback" not in out.stderr


@pytest.fixture
def netns() -> Iterator[NetworkNamespace]:
    why = namespace_unavailable()
    if why:
        pytest.skip(why)
    with NetworkNamespace() as ns:
        yield ns


@pytest.mark.e2e
def test_demo_moves_off_the_default_ports_when_they_are_taken(netns: NetworkNamespace) -> None:
    """Beside the README's own daemon (8080 and 8470 taken), the demo runs on free ports
    and says so, one line each. In a network namespace: the defaults are ours to take."""
    hold = (
        "import socket, sys\n"
        "from supervisor.cli import main\n"
        "held = []\n"
        "for port in (8080, 8470):\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', port)); s.listen(); held.append(s)\n"
        "sys.exit(main(['demo', '--tokens', '100']))\n"
    )
    out = subprocess.run(
        netns.command([sys.executable, "-c", hold]), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for default, what, flag in (
        (8080, "the frontend", "--port"),
        (8470, "the admin API", "--admin-port"),
    ):
        said = [line for line in lines if line.startswith(f"port {default} ({what}) is in use")]
        assert len(said) == 1 and f"(choose with {flag})" in said[0], out.stdout
    assert "token-exact with an unbroken run: yes" in out.stdout


@pytest.mark.e2e
def test_a_taken_port_chosen_for_the_demo_is_named_in_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = demo("--port", str(port))
    assert out.returncode == 2, out
    assert out.stderr == f"demo: port {port} (the frontend) is in use; choose another with --port\n"
    assert out.stdout == ""
