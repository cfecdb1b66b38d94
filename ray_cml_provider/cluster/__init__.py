"""A cluster seen from outside, as a library: a client for the workspace a cluster YAML
names (``workspace``), the cluster's status joined from CML and Ray (``status``) and Ray's
side of it (``ray_view``). The commands in ``ops/`` and the Python API (``api.py``) sit on
top of it and only parse arguments and render; this floor never prints."""
