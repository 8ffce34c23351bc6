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
    assert "pip install -e ." in setup and "ray[default]==2.60.0" in setup


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
