"""``ray-cml``: the project's command line. Each subcommand is a module with its own parser.

Library code raises; here an error of ours (``errors.RayCMLError``) or of CML's API becomes
one ``ray-cml:`` sentence on stderr and an exit status, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from ray_cml_provider.cml import CMLError
from ray_cml_provider.errors import RayCMLError, one_line
from ray_cml_provider.provider.workspace_check import explain

# name -> (module whose main(argv) runs it, one-line help)
SUBCOMMANDS = {
    "init": (
        "ray_cml_provider.ops.init",
        "write a commented cluster YAML from a few flags",
    ),
    "doctor": (
        "ray_cml_provider.ops.doctor",
        "check the workspace is ready for a cluster YAML, before anything runs",
    ),
    "status": (
        "ray_cml_provider.ops.status",
        "the cluster's nodes as CML and Ray see them (--json for scripts)",
    ),
    "top": (
        "ray_cml_provider.ops.top",
        "what the cluster and its models do now: requests, latency, tokens, nodes (--json)",
    ),
    "job": (
        "ray_cml_provider.ops.job",
        "a Ray job as a batch job: submit (the cluster up first, --down after), list, logs, stop",
    ),
    "history": (
        "ray_cml_provider.ops.history",
        "what past runs of a cluster did, after they are gone: jobs, logs, nodes, autoscaler",
    ),
    "endpoint-key": (
        "ray_cml_provider.ops.endpoint_key",
        "print the key callers of the head's URL send when it bypasses CML's login",
    ),
    "metrics-key": (
        "ray_cml_provider.ops.metrics_key",
        "print the key a scraper of the head's /metrics sends (figures only)",
    ),
    "model": (
        "ray_cml_provider.ops.model",
        "fill the project's model cache once; every cluster's replicas load from it",
    ),
    "token": (
        "ray_cml_provider.ops.token",
        "print the cluster's Ray token (every Ray port of the cluster asks for it)",
    ),
    "gc": (
        "ray_cml_provider.ops.gc",
        "find (and with --yes delete) applications whose cluster's head is gone",
    ),
    "emulator": (
        "ray_cml_provider.emulator.main",
        "run the local CML API v2 emulator",
    ),
    "demo": (
        "ray_cml_provider.demo.cli",
        "the offline demo: ray up, a GPU worker added and removed, ray down",
    ),
    "validate": (
        "ray_cml_provider.provider.config",
        "check a cluster YAML without calling any API",
    ),
    "preflight": (
        "ray_cml_provider.llm.preflight",
        "can a Serve config's replicas be placed on a cluster config?",
    ),
    "prepare-model": (
        "ray_cml_provider.llm.prepare_model",
        "convert the CPU twin's model once (run in .venv-vllm)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module, _ = SUBCOMMANDS[argv[0]]
        try:
            return importlib.import_module(module).main(argv[1:])
        except RayCMLError as exc:
            print(one_line(exc), file=sys.stderr)
            return exc.exit_code
        except CMLError as exc:
            print(f"ray-cml: {explain(exc)}", file=sys.stderr)
            return 1
    parser = argparse.ArgumentParser(
        prog="ray-cml",
        description="Ray clusters on Cloudera Machine Learning. "
        "'ray-cml COMMAND --help' describes each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in SUBCOMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
