"""A CML API v2 emulator whose applications are real local processes.

Split the way a fake cloud should be (moto's server mode):

- ``state``: the workspace model and its reconciler (applications through CML's states);
- ``processes``: engines as process groups, each with its own loopback IP;
- ``project_files``: the shared /home/cdsw, with NFS-like visibility delays;
- ``validation`` and ``listing``: what a request may say, and CML's filter/sort/paging;
- ``cml_api``: the CML API v2 handlers; ``control``: the test-control ``/_emulator/`` ones;
- ``routing``: requests, responses, the route table; ``traffic``: faults and counters;
- ``server``: the dispatcher (auth, faults, the project checked once) and the HTTP server;
- ``main``: the command line; ``harness``: start one as a child process (tests, demo).
"""
