"""Sent with `ray submit CONFIG set_gpu_demand.py N`: pin a demand of N one-GPU bundles
(0 clears it). The demand stays after this script exits."""

import sys

import ray
from ray.autoscaler.sdk import request_resources

ray.init(address="auto")
count = int(sys.argv[1])
request_resources(bundles=[{"GPU": 1}] * count)
print(f"GPU demand set to {count}", flush=True)
