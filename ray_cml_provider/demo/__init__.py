"""The demo wing: the offline demos (``ray-cml demo``) and the harness that drives Ray's own
CLI against a cluster YAML on the emulator (``local_cluster``), shared with the end-to-end
tests and the benchmarks. Nothing below this package imports it."""
