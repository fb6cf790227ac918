"""cluster.yaml passes the checks `ray up` runs before it touches AWS, and keeps its structural promises.

`ray up` first merges the file with the provider's defaults (`prepare_config`) and later validates it
against Ray's own JSON schema (`validate_config`, ray/autoscaler/ray-schema.json). Both steps are
offline; the AWS-specific bootstrap after them (IAM, security groups, AMI lookup) needs credentials and
the network, so it is not exercised here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def _load(path: Path = CLUSTER_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _ray_check(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before any cloud call; returns the merged config."""
    merged = prepare_config(copy.deepcopy(config))
    validate_config(merged)
    return merged


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    return _ray_check(_load())


def test_passes_rays_own_validation(merged: dict[str, Any]) -> None:
    assert merged["head_node_type"] in merged["available_node_types"]
    # Our values survive the merge with Ray's defaults (a shallow dict.update).
    assert merged["provider"]["type"] == "aws"
    assert merged["idle_timeout_minutes"] == _load()["idle_timeout_minutes"]


def _with_key_renamed(config: dict[str, Any], path: tuple[str, ...], new_name: str) -> dict[str, Any]:
    bad = copy.deepcopy(config)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    parent[new_name] = parent.pop(path[-1])
    return bad


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("idle_timeout_minutes",), "idle_timout_minutes"),
        (("head_node_type",), "head_node_typ"),
        (("available_node_types", "gpu_g5", "max_workers"), "max_worker"),
        (("available_node_types", "gpu_g6", "node_config"), "node_confg"),
        (("rsync_exclude",), "rsync_exlude"),
    ],
)
def test_typo_is_rejected_by_the_same_check(tmp_path: Path, path: tuple[str, ...], typo: str) -> None:
    bad_file = tmp_path / "cluster.yaml"
    bad_file.write_text(yaml.safe_dump(_with_key_renamed(_load(), path, typo)))
    with pytest.raises(jsonschema.ValidationError, match=typo):
        _ray_check(_load(bad_file))


def test_provider_keys_are_known_to_rays_schema() -> None:
    # The schema lets `provider` take any key (additionalProperties: true), so a typo there (say
    # `cache_stoped_nodes`) would pass `ray up` silently: hold our keys to the properties it documents.
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    known = json.loads(schema_path.read_text())["properties"]["provider"]["properties"]
    assert set(_load()["provider"]) <= set(known)


def test_head_is_on_demand_and_takes_no_trials(merged: dict[str, Any]) -> None:
    head = merged["available_node_types"][merged["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    # CPU: 0 keeps trials (and post-phase Ray tasks) off the head; the driver needs no slot there.
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def _workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def test_workers_are_spot_gpu_nodes_that_scale_to_zero(merged: dict[str, Any]) -> None:
    workers = _workers(merged)
    assert workers
    for name, node in workers.items():
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node["resources"]["GPU"] >= 1, name
        assert node["resources"]["CPU"] >= 1, name
        assert node["min_workers"] == 0, name
        assert 0 < node["max_workers"] <= merged["max_workers"], name
        # Spot capacity is not cached as stopped instances (they cannot be stopped).
    assert merged["provider"]["cache_stopped_nodes"] is False


def test_every_node_names_its_ami(merged: dict[str, Any]) -> None:
    # Ray's fallback AMI (DLAMI Ubuntu 18.04, CUDA 11.2 driver) is too old for current torch wheels.
    for name, node in merged["available_node_types"].items():
        assert node["node_config"].get("ImageId", "").startswith("ami-"), name


def test_setup_installs_regstudy_from_the_synced_copy(merged: dict[str, Any]) -> None:
    mount = next(remote for remote, local in merged["file_mounts"].items() if local == ".")
    # prepare_config folds setup_commands into head_setup_commands and worker_setup_commands.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert f"pip install -e {mount}" in merged[key], key


def test_ray_version_of_image_matches_the_pin() -> None:
    import re

    from packaging.specifiers import SpecifierSet

    root = CLUSTER_YAML.parent
    pin = re.search(r"^ray==([0-9.]+)$", (root / "constraints-ci.txt").read_text(), re.M)
    assert pin is not None
    assert _load()["docker"]["image"].startswith(f"rayproject/ray:{pin.group(1)}-")
    allowed = re.search(r'"ray\[tune\]([^"]+)"', (root / "pyproject.toml").read_text())
    assert allowed is not None and pin.group(1) in SpecifierSet(allowed.group(1))


def test_every_node_mounts_shared_storage() -> None:
    config = _load()
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
