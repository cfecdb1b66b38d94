"""How a node is written down on the CML side (``provider/naming.py``), read back exactly."""

from __future__ import annotations

from ray_cml_provider.contract import (
    TAG_CLUSTER_NAME,
    application_name,
    application_prefix,
    encode_tags,
    parse_application,
)


def test_a_node_name_and_its_tags_read_back_as_written():
    name = application_name("team-a", "worker", "0123abcd")
    assert name == "ray-team-a-worker-0123abcd" and name.startswith(application_prefix("team-a"))
    tags = {TAG_CLUSTER_NAME: "team-a", "ray-user-node-type": "gpu_worker"}
    parsed = parse_application(name, encode_tags(tags))
    assert parsed is not None
    node, read_tags = parsed
    assert (node.cluster, node.kind, node.node_id) == ("team-a", "worker", "0123abcd")
    assert read_tags == tags


def test_a_prefix_match_is_not_a_cluster_match():
    # CML's name filter matches substrings: `ray-team-` also finds cluster `team-a`'s nodes.
    name = application_name("team-a", "head", "0123abcd")
    assert name.startswith(application_prefix("team"))
    parsed = parse_application(name, encode_tags({TAG_CLUSTER_NAME: "team-a"}))
    assert parsed and parsed[0].cluster == "team-a"
    # The tags name the cluster: a name that another cluster's tags would not produce is
    # not a node of either.
    assert parse_application(name, encode_tags({TAG_CLUSTER_NAME: "team"})) is None


def test_applications_not_written_by_ray_cml_are_not_nodes():
    tags = encode_tags({TAG_CLUSTER_NAME: "c1"})
    assert parse_application("ray-c1-worker-0badc0de", "a notebook") is None  # no tags
    assert parse_application("ray-c1-worker-0badc0de", "ray-cml node {not json") is None
    assert parse_application("ray-c1-worker-0badc0de", 'ray-cml node ["a list"]') is None
    assert parse_application("ray-c1-gpu-0badc0de", tags) is None  # no such kind
    assert parse_application("ray-c1-worker-0badc0d", tags) is None  # 7 hex digits
    assert application_prefix() == "ray-" and application_prefix("c1", "head") == "ray-c1-head-"
