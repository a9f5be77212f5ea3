"""The cluster files (cluster.yaml, cluster-onprem.yaml): Ray accepts them, and they are closed.

Closed means: no port but SSH open to the internet, the dashboard on the head's loopback
only, and Ray's token authentication on for every node, with the token sent to every node.
"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [REPO / "cluster.yaml", REPO / "cluster-onprem.yaml"]
# Where Ray looks for the token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set.
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
EVERYWHERE = {"0.0.0.0/0", "::/0"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SSH_PORT = 22


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def shell_segments(command: str) -> list[list[str]]:
    """The simple commands of a shell line, each split into words."""
    for separator in ("&&", "||", ";", "\n"):
        command = command.replace(separator, "\0")
    return [shlex.split(segment) for segment in command.split("\0") if segment.strip()]


def ray_start_commands(config: dict[str, Any]) -> list[tuple[dict[str, str], list[str]]]:
    """Every `ray start` of the file: (variables set for it, its arguments)."""
    found = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            for words in shell_segments(command):
                assignments = {}
                while words and "=" in words[0] and not words[0].startswith("-"):
                    name, value = words.pop(0).split("=", 1)
                    assignments[name] = value
                if len(words) >= 2 and Path(words[0]).name == "ray" and words[1] == "start":
                    found.append((assignments, words[2:]))
    return found


def flag_values(arguments: list[str], flag: str) -> list[str]:
    values = [
        argument.split("=", 1)[1] for argument in arguments if argument.startswith(flag + "=")
    ]
    values += [arguments[i + 1] for i, argument in enumerate(arguments[:-1]) if argument == flag]
    return values


def opened_to_everyone(rule: dict[str, Any]) -> bool:
    ranges = [entry.get("CidrIp") for entry in rule.get("IpRanges", [])]
    ranges += [entry.get("CidrIpv6") for entry in rule.get("Ipv6Ranges", [])]
    return any(cidr in EVERYWHERE for cidr in ranges)


def is_ssh_only(rule: dict[str, Any]) -> bool:
    return (
        rule.get("IpProtocol") == "tcp"
        and rule.get("FromPort") == SSH_PORT
        and rule.get("ToPort") == SSH_PORT
    )


def security_problems(config: dict[str, Any]) -> list[str]:
    """What in a cluster file opens the cluster; empty when it is closed."""
    problems = []
    provider = config["provider"]
    if provider["type"] == "aws":
        # Ray's own group admits SSH from anywhere and everything from inside the group;
        # these are the rules added to it.
        for rule in provider.get("security_group", {}).get("IpPermissions", []):
            if opened_to_everyone(rule) and not is_ssh_only(rule):
                problems.append(f"security group opens {rule} to the internet")
        for name, node_type in config["available_node_types"].items():
            if "SecurityGroupIds" in node_type["node_config"]:
                problems.append(f"{name} uses its own security groups, not the cluster's")
    run_options = [*config.get("docker", {}).get("run_options", [])]
    run_options += config.get("docker", {}).get("head_run_options", [])
    run_options += config.get("docker", {}).get("worker_run_options", [])
    for option in run_options:
        first_word = option.split()[0]
        if first_word in ("-p", "-P") or first_word.startswith("--publish"):
            problems.append(f"docker publishes ports: {option}")

    heads = [args for _, args in ray_start_commands(config) if "--head" in args]
    if not heads:
        problems.append("no `ray start --head` among head_start_ray_commands")
    for arguments in heads:
        hosts = flag_values(arguments, "--dashboard-host")
        if not hosts or any(host not in LOOPBACK for host in hosts):
            problems.append(f"the dashboard is not on loopback: --dashboard-host={hosts}")

    token_mounted = DEFAULT_TOKEN_PATH in config.get("file_mounts", {})
    for assignments, arguments in ray_start_commands(config):
        if assignments.get("RAY_AUTH_MODE") != "token":
            problems.append(f"ray start {' '.join(arguments)} runs without RAY_AUTH_MODE=token")
        if not token_mounted and not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(assignments):
            problems.append("the token is not sent to the nodes")
        # On-prem servers often have several interfaces; Ray must not pick one itself.
        if provider["type"] == "local" and not flag_values(arguments, "--node-ip-address"):
            problems.append(f"ray start {' '.join(arguments)} leaves the node's address to Ray")
    return problems


def refuse_connection(*args: object) -> None:
    raise AssertionError(f"the validation tried to reach the network: {args}")


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_cluster_file_passes_rays_own_validation(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Filling defaults must not ask AWS (or anyone) anything: CI has no account.
    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    prepared = prepare_config(load(path))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_rays_validation_rejects_a_misspelt_key() -> None:
    config = load(REPO / "cluster.yaml")
    config["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_cluster_file_opens_only_ssh_keeps_the_dashboard_local_and_wants_the_token(
    path: Path,
) -> None:
    config = load(path)
    assert security_problems(config) == []
    # Every node type starts Ray through these commands: both kinds are there.
    assert {"--head" in arguments for _, arguments in ray_start_commands(config)} == {True, False}


def opened(port: int, cidr: str = "0.0.0.0/0") -> dict[str, Any]:
    ranges = (
        {"Ipv6Ranges": [{"CidrIpv6": cidr}]} if ":" in cidr else {"IpRanges": [{"CidrIp": cidr}]}
    )
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges}


def replace_in(config: dict[str, Any], key: str, old: str, new: str) -> None:
    assert any(old in command for command in config[key]), f"{old!r} not in {key}"
    config[key] = [command.replace(old, new) for command in config[key]]


OPENINGS = [
    "dashboard port to the internet",
    "GCS port to every IPv6 address",
    "all ports to the internet",
    "a node type with its own security groups",
    "docker publishing the dashboard",
    "dashboard on every interface",
    "dashboard host left to Ray",
    "workers without token auth",
    "head with token auth off",
    "token not sent to the nodes",
]


def open_up(config: dict[str, Any], opening: str) -> None:
    """Make one of the mistakes the security check is there to catch."""
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    if opening == "dashboard port to the internet":
        rules.append(opened(8265))
    elif opening == "GCS port to every IPv6 address":
        rules.append(opened(6379, "::/0"))
    elif opening == "all ports to the internet":
        rules.append({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    elif opening == "a node type with its own security groups":
        config["available_node_types"]["head"]["node_config"]["SecurityGroupIds"] = ["sg-0123"]
    elif opening == "docker publishing the dashboard":
        config["docker"]["run_options"] = ["-p 8265:8265"]
    elif opening == "dashboard on every interface":
        replace_in(
            config,
            "head_start_ray_commands",
            "--dashboard-host=127.0.0.1",
            "--dashboard-host=0.0.0.0",
        )
    elif opening == "dashboard host left to Ray":
        replace_in(config, "head_start_ray_commands", "--dashboard-host=127.0.0.1", "")
    elif opening == "workers without token auth":
        replace_in(config, "worker_start_ray_commands", "RAY_AUTH_MODE=token ", "")
    elif opening == "head with token auth off":
        replace_in(
            config, "head_start_ray_commands", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"
        )
    elif opening == "token not sent to the nodes":
        del config["file_mounts"][DEFAULT_TOKEN_PATH]
    elif opening == "node address left to Ray":
        replace_in(
            config, "worker_start_ray_commands", "--node-ip-address=$RAY_CLOUD_INSTANCE_ID", ""
        )
    else:
        raise ValueError(f"unknown opening {opening!r}")


# The on-prem file has no security group or container; the rest applies to it too.
ONPREM_OPENINGS = [
    "dashboard on every interface",
    "dashboard host left to Ray",
    "workers without token auth",
    "head with token auth off",
    "token not sent to the nodes",
    "node address left to Ray",
]


@pytest.mark.parametrize(
    ("path", "opening"),
    [(REPO / "cluster.yaml", opening) for opening in OPENINGS]
    + [(REPO / "cluster-onprem.yaml", opening) for opening in ONPREM_OPENINGS],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_security_check_finds_an_opened_cluster(path: Path, opening: str) -> None:
    config = load(path)
    open_up(config, opening)
    assert security_problems(config) != []


def test_security_check_allows_ssh_from_anywhere() -> None:
    config = load(REPO / "cluster.yaml")
    config["provider"]["security_group"]["IpPermissions"] += [
        opened(SSH_PORT),
        opened(SSH_PORT, "::/0"),
    ]
    assert security_problems(config) == []
