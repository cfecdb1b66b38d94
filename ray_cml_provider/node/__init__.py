"""Everything that runs inside a CML application of a Ray cluster (see ``launcher.py``).

The bootstrap stage (``bootstrap``, ``environment``, ``project_api``, ``processes``,
``dirlock``, and ``ray_cml_provider.contract``) is standard library only and is uploaded
flat next to ``bootstrap.py`` in the cluster's folder; the launcher's parts run from the
shipped provider code in the node's environment.
"""
