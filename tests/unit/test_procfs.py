import os
import signal
import subprocess
import sys
import time

from supervisor.engines import group_members
from supervisor.procfs import process_tree, read_stat

# A parent in its own session that starts a child and waits.
TREE = (
    "import subprocess, sys, time; "
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(c.pid, flush=True); time.sleep(60)"
)


def test_process_tree_and_group_members_see_parent_and_child() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert p.stdout is not None
        child = int(p.stdout.readline())
        assert process_tree(p.pid) == [p.pid, child]
        assert sorted(group_members(p.pid)) == sorted([p.pid, child])
        st = read_stat(child)
        assert st is not None and st.ppid == p.pid and st.pgrp == p.pid and not st.gone
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 5
    while group_members(p.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert group_members(p.pid) == []  # zombies awaiting a reaper do not count
    assert read_stat(2**22 + 12345) is None
