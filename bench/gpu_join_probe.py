"""Sent to the head with `ray submit` by bench/scale_bench.py: demand one GPU and time the
moment a new node joins Ray. Prints one line: BENCH {json}."""

import json
import time

import ray

ray.init(address="auto")
before = {node["NodeID"] for node in ray.nodes() if node["Alive"]}


@ray.remote(num_gpus=1)
def needs_a_gpu() -> int:
    return 1


t_demand = time.time()
ref = needs_a_gpu.remote()
while True:
    joined = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
    if joined:
        t_join = time.time()
        break
    time.sleep(0.05)
ray.get(ref)
print("BENCH " + json.dumps({"t_demand": t_demand, "t_join": t_join, "t_done": time.time()}))
