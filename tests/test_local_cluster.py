"""The harness's reading of ``ray status`` (the e2e tests and benchmarks rely on it)."""

from __future__ import annotations

from ray_cml_provider.demo.local_cluster import RayStatus

RAY_STATUS = """======== Autoscaler status: 2026-11-26 12:00:00 ========
Node status
---------------------------------------------------------------
Active:
 1 head
Idle:
 (no idle nodes)
Pending:
 (no pending nodes)
Recent failures:
 gpu_worker: LaunchFailed (latest_attempt: 12:00:00) - over the workspace's quota
 NodeTerminated (instance_id: 0badc0de)

Resources
---------------------------------------------------------------
Usage:
 0.0/1.0 GPU
"""


def test_sections_list_their_entries_and_not_rays_placeholders():
    status = RayStatus(RAY_STATUS)
    assert status.section("Active:") == ["1 head"]
    assert status.pending == []
    assert status.recent_failures == [
        "gpu_worker: LaunchFailed (latest_attempt: 12:00:00) - over the workspace's quota",
        "NodeTerminated (instance_id: 0badc0de)",
    ]
    launching = RayStatus(RAY_STATUS.replace("(no pending nodes)", "gpu_worker, 1 launching"))
    assert launching.pending == ["gpu_worker, 1 launching"]
    assert RayStatus("ray status failed").pending == []
