"""Sent with `ray submit`: ask the autoscaler to keep one GPU worker, whatever the load."""

import ray
from ray.autoscaler.sdk import request_resources

ray.init(address="auto")
request_resources(bundles=[{"GPU": 1}])
print("pinned one GPU", flush=True)
