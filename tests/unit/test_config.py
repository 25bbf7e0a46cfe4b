import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import ConfigError, SlotConfig, load, parse

GOOD = {
    "slot": [{"name": "a", "model": "m", "backend": "vllm", "base_port": 9000, "simulate": True}]
}


def test_defaults_are_filled_in() -> None:
    cfg = parse(GOOD)
    assert cfg.admin_host == "127.0.0.1" and cfg.health.failure_threshold == 3
    s = cfg.slots[0]
    assert (s.shadows, s.placement, s.gpus) == (1, "paired", ("0",))
    assert SlotConfig("a", "m", "vllm", 9000).simulate is False  # real engines by default


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "slot: at least one [[slot]] is required"),
        ({"slot": [{"name": "a"}]}, "slot[0].model: required"),
        (
            {"slot": [{**GOOD["slot"][0], "shadows": "two"}]},
            "slot[0].shadows: must be an integer >= 0, got 'two'",
        ),
        (
            {"slot": [{**GOOD["slot"][0], "placement": "near"}]},
            "slot[0].placement: must be one of 'paired', 'pooled'",
        ),
        (
            {**GOOD, "frontend": {"whole_upstream_max_tokens": -1}},
            "frontend.whole_upstream_max_tokens: must be an integer >= 0, got -1",
        ),
        (
            {**GOOD, "frontend": {"coalesce_window": 0.5}},
            "frontend.coalesce_window: must be a number >= 0 and <= 0.05, got 0.5",
        ),
        (
            {**GOOD, "frontend": {"coalesce_window": -0.001}},
            "frontend.coalesce_window: must be a number >= 0 and <= 0.05, got -0.001",
        ),
        (
            {"slot": [{**GOOD["slot"][0], "backend": "nope"}]},
            "slot[0].backend: no backend named 'nope' (registered: ",
        ),
        ({"slot": [{**GOOD["slot"][0], "gpus": [0]}]}, "slot[0].gpus: must be a list of strings"),
        ({"slot": [{**GOOD["slot"][0], "colour": 1}]}, "slot[0].colour: unknown key"),
        ({**GOOD, "health": {"probe_interval": 0}}, "health.probe_interval: must be a number > 0"),
        (
            {**GOOD, "health": {"failure_threshold": True}},
            "health.failure_threshold: must be an integer >= 1, got True",
        ),
        ({**GOOD, "admin": {"port": 70000}}, "admin.port: must be an integer >= 0 and <= 65535"),
        ({"slot": [GOOD["slot"][0], GOOD["slot"][0]]}, "slot[1].name: 'a' is already slot[0]'s"),
        (
            {"slot": [{**GOOD["slot"][0], "backend": "trtllm"}]},
            "slot[0].shadows: backend 'trtllm' has no sleep mode",
        ),
        (
            {
                "slot": [
                    {**GOOD["slot"][0], "placement": "pooled", "shadows": 2, "shadow_gpus": [["1"]]}
                ]
            },
            "slot[0].shadow_gpus: pooled placement needs one GPU list per shadow (2), got 1",
        ),
        (
            {**GOOD, "failover": {"shadow_sleep_level": 3}},
            "failover.shadow_sleep_level: must be an integer >= 1 and <= 2, got 3",
        ),
        ({**GOOD, "nodes": {}}, "nodes: unknown key"),
        # A keyword or a path: a misspelt keyword was taken as a file the daemon created.
        (
            {**GOOD, "gpu": {"xid_source": "kmesg"}},
            "gpu.xid_source: must be one of 'auto', 'kmsg', 'journal', 'none', 'off', or a "
            "file path containing '/' (e.g. './kmesg'), got 'kmesg'",
        ),
        ({**GOOD, "gpu": {"nvml": "yes"}}, "gpu.nvml: must be one of 'auto', 'on', 'off', or"),
        (
            {**GOOD, "frontend": {"max_buffered_bytes": 10}},
            "frontend.max_buffered_bytes: must be an integer >= 1048576",
        ),
        ({**GOOD, "frontend": {"body_timeout": 0}}, "frontend.body_timeout: must be a number > 0"),
    ],
)
def test_every_error_names_the_key_and_the_fix(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert any(p.startswith(expected) for p in e.value.problems), e.value.problems


def test_every_section_reaches_the_config() -> None:
    cfg = parse(
        {
            **GOOD,
            "node": {"name": "n9", "on_exit": "leave"},
            "admin": {"port": 9999},
            "health": {"probe_timeout": 2.5},
            "failover": {"wake_timeout": 7, "kill_dead_group": False},
            "frontend": {"max_inflight_per_engine": 4, "port": 9100},
        }
    )
    assert (cfg.node, cfg.on_exit, cfg.admin_port) == ("n9", "leave", 9999)
    assert cfg.health.probe_timeout == 2.5
    assert (cfg.failover.wake_timeout, cfg.failover.kill_dead_group) == (7, False)
    assert (cfg.frontend.max_inflight_per_engine, cfg.frontend.port) == (4, 9100)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"health": {"probe_timeout": -1}, "slot": [{"name": "a", "shadows": -1}]})
    assert len(e.value.problems) >= 4


def test_keywords_and_paths_are_told_apart() -> None:
    gpu = parse({**GOOD, "gpu": {"xid_source": "off", "nvml": "./readings.json"}}).gpu
    assert (gpu.xid_source, gpu.nvml) == ("off", "./readings.json")
    assert parse({**GOOD, "gpu": {"xid_source": "/var/log/xid.log"}}).gpu.xid_source.startswith("/")


def test_example_config_is_valid() -> None:
    cfg = load(Path(__file__).parents[2] / "examples" / "sim-single-node.toml")
    assert [s.name for s in cfg.slots] == ["chat", "code"]


def test_example_cluster_configs_are_valid() -> None:
    root = Path(__file__).parents[2] / "examples" / "cluster"
    a, b = load(root / "node-a.toml"), load(root / "node-b.toml")
    assert a.cluster.name == b.cluster.name == "demo"
    assert (a.slots[0].hosts, b.slots[0].hosts) == ("active", "shadows")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], capture_output=True, text=True
    )


def test_check_config_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[slot]]\nname = "a"\nmodel = "m"\nbackend = "vllm"\nbase_port = "x"\n')
    out = run_cli("check-config", str(bad))
    assert out.returncode == 2
    assert "slot[0].base_port: must be an integer" in out.stderr
    assert "Traceback" not in out.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[[slot]\n")
    out = run_cli("check-config", str(broken))
    assert out.returncode == 2 and "not valid TOML" in out.stderr
    out = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    out = run_cli("run", "--config", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    good = tmp_path / "good.toml"
    good.write_text(
        '[[slot]]\nname = "a"\nmodel = "m"\nbackend = "vllm"\nbase_port = 9000\nsimulate = true\n'
    )
    out = run_cli("check-config", str(good))
    assert out.returncode == 0 and "OK" in out.stdout


def test_status_cli_without_a_daemon_says_so() -> None:
    out = run_cli("status", "--admin", "http://127.0.0.1:9")
    assert out.returncode == 2 and "cannot reach the admin API" in out.stderr


def test_a_real_engine_must_be_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        parse({"slot": [{**GOOD["slot"][0], "simulate": False}]})
    assert any("'vllm' is not on PATH" in p and "simulate = true" in p for p in e.value.problems)
    parse(GOOD)  # simulate = true: the simulator needs no engine


def test_run_with_a_port_in_use_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[node]\nstate_dir = "{tmp_path}"\n[admin]\nport = {port}\n'
            '[[slot]]\nname = "a"\nmodel = "m"\nbackend = "vllm"\nbase_port = 19061\n'
            "simulate = true\n"
        )
        out = run_cli("run", "--config", str(cfg))
    assert out.returncode == 1
    assert "cannot start" in out.stderr and "address already in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_environment_overrides(tmp_path: Path) -> None:
    from supervisor.config import load

    path = tmp_path / "c.toml"
    path.write_text(
        '[[slot]]\nname = "a"\nmodel = "m"\nbackend = "vllm"\nbase_port = 9000\nsimulate = true\n'
    )
    cfg = load(
        path,
        env={
            "FAILOVER_SUPERVISOR_ADMIN_PORT": "9999",
            "FAILOVER_SUPERVISOR_NODE_NAME": "gpu-node-7",
            "FAILOVER_SUPERVISOR_HEALTH_PROBE_TIMEOUT": "2.5",
            "UNRELATED": "x",
        },
    )
    assert (cfg.admin_port, cfg.node, cfg.health.probe_timeout) == (9999, "gpu-node-7", 2.5)
    with pytest.raises(ConfigError) as e:
        load(path, env={"FAILOVER_SUPERVISOR_ADMIN_PORT": "many"})
    assert e.value.problems == ["admin.port: must be an integer >= 0 and <= 65535, got 'many'"]
    with pytest.raises(ConfigError) as e:
        load(path, env={"FAILOVER_SUPERVISOR_NOPE_X": "1"})
    assert "not a config key" in e.value.problems[0]


def test_risky_settings_are_warned_about_but_valid(tmp_path: Path) -> None:
    from supervisor.config import warnings

    assert warnings(parse(GOOD)) == []  # the defaults are not risky
    risky = parse(
        {
            **GOOD,
            "frontend": {"migration_wait": 5, "host": "0.0.0.0"},
            "failover": {"wake_oom_retry": 0},
        }
    )
    text = "\n".join(warnings(risky))
    assert "serves anyone who reaches it" in text
    assert "may give up before its slot's shadow is awake" in text
    assert "wake_oom_retry = 0 with paired shadows" in text
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        '[frontend]\nhost = "0.0.0.0"\n[[slot]]\nname = "a"\nmodel = "m"\n'
        'backend = "vllm"\nbase_port = 9000\nsimulate = true\n'
    )
    out = run_cli("check-config", str(cfg))
    assert out.returncode == 0 and "warning: frontend.host" in out.stderr


def test_an_admin_api_on_the_network_without_a_token_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse({**GOOD, "admin": {"host": "0.0.0.0"}})
    assert "admin.token_file is required" in e.value.problems[0]
    token = tmp_path / "t"
    token.write_text("s3cret\n")
    cfg = parse({**GOOD, "admin": {"host": "0.0.0.0", "token_file": str(token)}})
    assert cfg.admin_host == "0.0.0.0"


def test_systemd_example_config_is_valid_where_vllm_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "vllm"  # stands in for an installed vLLM: only its presence is checked
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    cfg = load(Path(__file__).parents[2] / "systemd" / "config.example.toml", env={})
    assert [s.name for s in cfg.slots] == ["qwen-0", "qwen-1"]
    assert cfg.on_exit == "leave" and cfg.admin_token_file


CLUSTER = {"etcd_endpoints": ["http://127.0.0.1:2379"], "nats_servers": ["nats://127.0.0.1:4222"]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**GOOD, "cluster": {}}, "cluster.etcd_endpoints: required in a [cluster]"),
        (
            {**GOOD, "cluster": {"etcd_endpoints": ["127.0.0.1:2379"]}},
            "cluster.etcd_endpoints: '127.0.0.1:2379' must be an http(s):// URL",
        ),
        (
            {**GOOD, "cluster": {**CLUSTER, "nats_servers": ["127.0.0.1:4222"]}},
            "cluster.nats_servers: '127.0.0.1:4222' must be a nats:// URL",
        ),
        ({**GOOD, "cluster": {**CLUSTER, "lease_ttl": 1}}, "cluster.lease_ttl: etcd leases"),
        (
            {**GOOD, "cluster": {**CLUSTER, "etcd_unreachable": "panic"}},
            "cluster.etcd_unreachable: must be one of 'keep-serving', 'stop-promoting'",
        ),
        ({**GOOD, "cluster": {**CLUSTER, "colour": 1}}, "cluster.colour: unknown key"),
        (
            {"slot": [{**GOOD["slot"][0], "hosts": "shadows"}]},
            'slot[0]: hosts = "shadows" and group_size need a [cluster]',
        ),
        (
            {"cluster": CLUSTER, "slot": [{**GOOD["slot"][0], "group_size": 2, "group_rank": 2}]},
            "slot[0].group_rank: 2 is not below group_size (2)",
        ),
        (
            {"cluster": CLUSTER, "slot": [{**GOOD["slot"][0], "hosts": "shadows", "shadows": 0}]},
            'slot[0].shadows: hosts = "shadows" needs shadows >= 1',
        ),
    ],
)
def test_cluster_errors_name_the_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert expected in str(e.value), str(e.value)


def test_cluster_config_and_its_warnings() -> None:
    from supervisor.config import warnings

    cfg = parse({**GOOD, "cluster": {**CLUSTER, "name": "prod", "lease_ttl": 2}})
    assert cfg.cluster.enabled and cfg.cluster.name == "prod"
    assert cfg.cluster.heartbeat_interval == 0.25 and cfg.cluster.etcd_unreachable == "keep-serving"
    assert not parse(GOOD).cluster.enabled  # no [cluster]: one node, no servers
    risky = parse({**GOOD, "cluster": {**CLUSTER, "lease_ttl": 2, "heartbeat_interval": 1.0}})
    assert any("shorter than 3 heartbeats" in w for w in warnings(risky))
    no_nats = parse({**GOOD, "cluster": {"etcd_endpoints": CLUSTER["etcd_endpoints"]}})
    assert any("nats_servers is empty" in w for w in warnings(no_nats))
    assert not [w for w in warnings(cfg) if "cluster" in w]


def test_cuda_checkpoint_suspend_is_checked_against_this_machine() -> None:
    import ctypes.util

    slot = {**GOOD["slot"][0], "backend": "trtllm", "suspend": "cuda-checkpoint"}
    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has libcuda: the strategy can work here")
    with pytest.raises(ConfigError) as e:
        parse({"slot": [slot]})
    assert "slot[0].suspend: cuda-checkpoint cannot work here: libcuda" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse({"slot": [{**slot, "suspend": "freeze"}]})
    assert "slot[0].suspend: must be one of 'engine', 'cuda-checkpoint'" in str(e.value)
