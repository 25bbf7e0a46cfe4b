"""The test harness's port picker: a port it hands out is not handed out again while the
daemon it was meant for may not have bound it yet."""

from supervisor.testing.cluster import free_port, free_port_range


def test_ports_handed_out_are_not_given_twice() -> None:
    # None of these is bound, as a node's admin port is not until its daemon starts: "free
    # right now" alone gives repeats after a few hundred draws from ~22,000 ports.
    singles = [free_port() for _ in range(1500)]
    assert len(set(singles)) == len(singles)
    ranges = [free_port_range(3) for _ in range(300)]
    in_ranges = [base + i for base in ranges for i in range(3)]
    assert len(set(in_ranges)) == len(in_ranges)
    assert set(singles).isdisjoint(in_ranges)
