"""A CML API v2 emulator whose applications are real local processes.

Split like a fake cloud should be: ``state`` (the workspace model and its reconciler),
``processes`` (engines as process groups), ``project_files`` (the shared /home/cdsw),
``http_api`` (routes, auth, faults, counters) and ``main`` (the command line).
"""
