"""The Ray cluster configs (cluster.yaml, cluster-local.yaml) against Ray's own schema.

The configs are checked the way `ray up` checks them before touching any
machine: `prepare_config` merges the provider's bundled defaults.yaml (and, for
the local provider, builds its single node type from head_ip / worker_ips),
then `validate_config` runs Ray's JSON schema and its cross-field checks. Both
only read files shipped inside the ray package; sockets are blocked below to
prove that no network and no cloud credentials are needed.

On top of the schema: facts about this project's setup that a schema cannot
know (GPU placement, the head-only custom resource, what setup installs, where
MLflow listens), and negative cases showing the validation really rejects bad
configs.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
import socket
import subprocess
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster-local.yaml"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def prepared(config: dict) -> dict:
    """What `ray up` would work with; raises if Ray rejects the config."""
    result = prepare_config(copy.deepcopy(config))
    validate_config(result)
    return result


@pytest.fixture(scope="module")
def aws() -> dict:
    return load(AWS)


@pytest.fixture(scope="module")
def local() -> dict:
    return load(LOCAL)


def mlflow_command(config: dict) -> list[str]:
    matches = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(matches) == 1, "exactly one head start command must start the MLflow server"
    # Keep only the `mlflow server ...` part, up to its redirection.
    tail = matches[0].split("mlflow server", 1)[1].split(">", 1)[0]
    return shlex.split("mlflow server" + tail)


def option(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not given in {argv}")


# ----------------------------------------------------------------------------
# Both configs pass Ray's own validation.


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=lambda p: p.name)
def test_ray_accepts_config(path):
    config = prepared(load(path))
    assert config["head_node_type"] in config["available_node_types"]


# ----------------------------------------------------------------------------
# cluster.yaml (AWS)


def test_aws_head_has_no_gpu_and_workers_have_gpus(aws):
    config = prepared(aws)
    types = config["available_node_types"]
    head_type = config["head_node_type"]
    assert types[head_type]["resources"].get("GPU", 0) == 0
    assert types[head_type]["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != head_type}
    assert workers, "no worker node type"
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] <= config["max_workers"], name


def test_aws_workers_are_spot_and_head_is_not(aws):
    types = aws["available_node_types"]
    head_type = aws["head_node_type"]
    assert "InstanceMarketOptions" not in types[head_type]["node_config"]
    for name, node_type in types.items():
        if name != head_type:
            market = node_type["node_config"]["InstanceMarketOptions"]
            assert market["MarketType"] == "spot", name


def test_aws_head_resource_only_on_head(aws):
    types = aws["available_node_types"]
    head_type = aws["head_node_type"]
    assert types[head_type]["resources"]["head"] >= 1
    for name, node_type in types.items():
        if name != head_type:
            assert "head" not in node_type["resources"], name


def test_aws_docker_images_match_installed_ray(aws):
    docker = aws["docker"]
    expected = f"rayproject/ray:{ray.__version__}-py311"
    assert docker["image"] == f"{expected}-gpu"
    assert docker["head_image"] == f"{expected}-cpu"


def test_aws_ami_is_set_explicitly(aws):
    # Without ImageId Ray falls back to an old CUDA 11 AMI that cannot run torch 2.14.
    for name, node_type in aws["available_node_types"].items():
        assert node_type["node_config"].get("ImageId"), name


def test_aws_artifacts_and_results_go_to_a_bucket(aws):
    assert option(mlflow_command(aws), "--artifacts-destination").startswith("s3://")
    text = AWS.read_text()
    assert "--storage-path s3://" in text
    # Placeholders only: no account ids, ARNs or keys in the file.
    assert "arn:aws" not in text
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "aws_secret_access_key" not in text.lower()


# ----------------------------------------------------------------------------
# cluster-local.yaml (machines you already have)


def test_local_addresses(local):
    provider = local["provider"]
    head = ipaddress.ip_address(provider["head_ip"])
    workers = [ipaddress.ip_address(ip) for ip in provider["worker_ips"]]
    assert workers, "no worker_ips"
    assert head not in workers
    assert len(set(workers)) == len(workers)
    node_type = prepared(local)["available_node_types"]["local.cluster.node"]
    assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= len(workers)


def test_local_head_resource_on_head_start_only(local):
    # The local provider ignores node-type resources, so `ray start` declares it.
    head_start = " ".join(local["head_start_ray_commands"])
    match = re.search(r"--resources='([^']*)'", head_start)
    assert match, "head `ray start` lacks --resources"
    resources = json.loads(match.group(1))
    assert isinstance(resources["head"], int) and resources["head"] >= 1
    assert "--resources" not in " ".join(local["worker_start_ray_commands"])


# ----------------------------------------------------------------------------
# Shared by both: the project is copied and installed, MLflow stays on loopback.


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=lambda p: p.name)
def test_setup_installs_this_project(path):
    config = load(path)
    assert config["file_mounts"]["~/kd-platform"] == "."
    assert (ROOT / "kd_platform").is_dir()  # "." is the repository root
    setup = config["setup_commands"]
    assert any(re.fullmatch(r"pip install -e ~/kd-platform/?", c.strip()) for c in setup)
    pip_lines = [shlex.split(c) for c in setup if c.strip().startswith("pip install")]
    for pin in TORCH_PINS:
        assert any(pin in argv for argv in pip_lines), pin


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=lambda p: p.name)
def test_mlflow_server_binds_loopback(path):
    config = load(path)
    argv = mlflow_command(config)
    assert option(argv, "--host") == "127.0.0.1"
    assert option(argv, "--port") == "5000"
    backend = option(argv, "--backend-store-uri")
    # $HOME expands to an absolute path on the head: sqlite:////home/...
    assert backend.startswith("sqlite:///$HOME/"), backend
    for command in config["head_start_ray_commands"]:
        assert "0.0.0.0" not in command, command


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=lambda p: p.name)
def test_node_commands_are_valid_bash(path):
    config = load(path)
    commands = (
        config["setup_commands"]
        + config["head_setup_commands"]
        + config["head_start_ray_commands"]
        + config["worker_start_ray_commands"]
    )
    for command in commands:
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)


def test_both_configs_share_setup_and_mlflow_server(aws, local):
    # The local config adds its venv bootstrap in front of the same commands.
    for command in aws["setup_commands"]:
        assert command in local["setup_commands"], command
    aws_argv, local_argv = mlflow_command(aws), mlflow_command(local)
    for name in ("--host", "--port", "--backend-store-uri"):
        assert option(aws_argv, name) == option(local_argv, name), name


# ----------------------------------------------------------------------------
# Negative cases: the validation above is real.


def _with(config: dict, edit) -> dict:
    broken = copy.deepcopy(config)
    edit(broken)
    return broken


AWS_BREAKAGES = {
    "unknown top-level key": lambda c: c.update(max_worker=3),
    "unknown node-type key": lambda c: c["available_node_types"]["gpu_spot"].update(gpus=1),
    "fractional custom resource": lambda c: c["available_node_types"]["head_cpu"][
        "resources"
    ].update(head=0.5),
    "negative resource": lambda c: c["available_node_types"]["gpu_spot"]["resources"].update(
        GPU=-1
    ),
    "missing node_config": lambda c: c["available_node_types"]["gpu_spot"].pop("node_config"),
    "unknown docker key": lambda c: c["docker"].update(gpu_image="x"),
}


@pytest.mark.parametrize("edit", AWS_BREAKAGES.values(), ids=AWS_BREAKAGES.keys())
def test_ray_rejects_broken_aws_config(aws, edit):
    with pytest.raises(jsonschema.ValidationError):
        prepared(_with(aws, edit))


def test_ray_rejects_min_workers_above_global_max(aws):
    def edit(config):
        config["available_node_types"]["gpu_spot"]["min_workers"] = config["max_workers"] + 1

    with pytest.raises(ValueError, match="max_workers"):
        prepared(_with(aws, edit))


def test_ray_rejects_unknown_head_node_type(aws):
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(_with(aws, lambda c: c.update(head_node_type="nope")))


def test_ray_rejects_broken_local_config(local):
    with pytest.raises(jsonschema.ValidationError):
        prepared(_with(local, lambda c: c.update(head_resources={"head": 1})))
    # The local provider builds its own node type and refuses user-defined ones.
    with pytest.raises(click.ClickException, match="available_node_types"):
        prepared(
            _with(
                local,
                lambda c: c.update(
                    available_node_types={"x": {"resources": {}, "node_config": {}}},
                    head_node_type="x",
                ),
            )
        )
