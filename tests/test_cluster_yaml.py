"""cluster.yaml and cluster-local.yaml validated offline with Ray's own autoscaler checks."""
import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_files_validate(name):
    cfg = yaml.safe_load(open(name))
    validate_config(prepare_config(copy.deepcopy(cfg)))
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -c constraints.txt -e ." in setup and "ray[default]==2.60.0" in setup  # one set of versions everywhere


def test_aws_file_has_cpu_head_and_spot_gpu_workers():
    cfg = yaml.safe_load(open("cluster.yaml"))
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert {t["node_config"]["InstanceType"] for t in gpu} == {"g5.2xlarge", "g5.12xlarge"}  # 1 and 4 GPUs
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in gpu)
    assert "." in cfg["file_mounts"].values()


def test_pinned_ray_matches_setup_cfg():
    import configparser

    import ray

    cp = configparser.ConfigParser()
    cp.read("setup.cfg")
    assert f"ray[tune]=={ray.__version__}" in cp["options"]["install_requires"]


def test_broken_config_is_rejected():
    cfg = yaml.safe_load(open("cluster.yaml"))
    cfg["available_node_types"]["gpu_1x"]["bogus_field"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(cfg))


OPEN = ("0.0.0.0", "::")  # every address, IPv4 and IPv6
RAY_PORTS = {6379, 8076, 8265, 10001}  # GCS, object manager, dashboard + job API, Ray client


def _open_ports(cfg: dict) -> list[str]:
    """Ray ports reachable from every address: a start command binding the dashboard or the
    client server to all interfaces, or a security-group rule open to 0.0.0.0/0 over a Ray port."""
    found = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key, []):
            for flag in ("--dashboard-host", "--ray-client-server-host", "--node-ip-address"):
                for host in OPEN:
                    if f"{flag}={host}" in cmd or f"{flag} {host}" in cmd:
                        found.append(f"{key}: {flag}={host}")
            if "--dashboard-host" not in cmd and "--head" in cmd:
                found.append(f"{key}: no --dashboard-host (Ray's default may change)")
    sg = cfg.get("provider", {}).get("security_group", {})
    for rule in sg.get("IpPermissions", []):
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if any(c in ("0.0.0.0/0", "::/0") for c in cidrs) and (rule.get("IpProtocol") == "-1" or any(lo <= p <= hi for p in RAY_PORTS)):
            found.append(f"security group: ports {lo}-{hi} open to {cidrs}")
    return found


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_no_ray_port_is_open_to_every_address_and_every_node_needs_the_token(name):
    cfg = yaml.safe_load(open(name))
    assert _open_ports(cfg) == []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), (key, starts)
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"]), "the token file travels to every node"
    if cfg["provider"]["type"] == "aws":
        assert cfg["provider"]["security_group"]["IpPermissions"], "SSH only, from the user's address"
        text = open(name).read()
        assert "aws_access_key_id" not in text.lower() and "AKIA" not in text  # S3 through the instance profile


def test_the_open_port_check_catches_what_it_is_for():
    """The check above must fail on the configurations it exists to refuse."""
    cfg = yaml.safe_load(open("cluster.yaml"))
    bad = copy.deepcopy(cfg)
    bad["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                      for c in bad["head_start_ray_commands"]]
    assert _open_ports(bad) == ["head_start_ray_commands: --dashboard-host=0.0.0.0"]
    bad = copy.deepcopy(cfg)
    bad["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert _open_ports(bad) == ["security group: ports 8265-8265 open to ['0.0.0.0/0']"]
    bad = copy.deepcopy(cfg)
    bad["head_start_ray_commands"] = [c.replace(" --dashboard-host=127.0.0.1", "") for c in bad["head_start_ray_commands"]]
    assert _open_ports(bad) == ["head_start_ray_commands: no --dashboard-host (Ray's default may change)"]


def test_constraints_pin_every_declared_package_and_the_code_imports_nothing_undeclared():
    """constraints.txt pins each install_requires package; every third-party module that steel_ray
    imports is declared in setup.cfg (Pillow and scikit-learn were missing)."""
    import ast
    import configparser
    import pathlib
    import re
    import sys

    cp = configparser.ConfigParser()
    cp.read("setup.cfg")
    declared = {re.split(r"[<>=\[ ]", r.strip())[0].lower().replace("_", "-")
                for r in cp["options"]["install_requires"].strip().splitlines()}
    pins = {line.split("==")[0].lower().replace("_", "-") for line in open("constraints.txt") if "==" in line}
    assert declared <= pins, declared - pins
    module_of = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn",
                 "iterstrat": "iterative-stratification", "segmentation_models_pytorch": "segmentation-models-pytorch"}
    imported = set()
    for f in pathlib.Path("steel_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names) if m not in ("steel_ray", "__future__")}
    undeclared = {m for m in third_party if module_of.get(m, m).lower().replace("_", "-") not in declared}
    assert not undeclared, undeclared
