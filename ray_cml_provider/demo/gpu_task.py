"""The demo's workload, sent with ``ray submit``: one task that needs a GPU.

The head has no GPUs, so this task can only run once the autoscaler has added a GPU worker
application for it.
"""

import os

import ray

ray.init(address="auto")


@ray.remote(num_gpus=1)
def where_am_i() -> dict:
    return {
        "node_ip": os.environ.get("CDSW_IP_ADDRESS"),
        "node_id": os.environ.get("RAY_CML_NODE_ID"),
        "gpu_ids": ray.get_gpu_ids(),
    }


print("GPU task ran on", ray.get(where_am_i.remote()), flush=True)
