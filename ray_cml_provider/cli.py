"""``ray-cml``: the project's command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="ray-cml", description="Ray clusters on Cloudera Machine Learning."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "emulator",
        help="run the local CML API v2 emulator (see 'ray-cml emulator --help')",
        add_help=False,
    )
    commands.add_parser(
        "demo",
        help="the offline demo: ray up, a GPU worker added and removed, ray down",
        add_help=False,
    )
    if argv and argv[0] == "emulator":
        from ray_cml_provider.emulator.main import main as emulator_main

        return emulator_main(argv[1:])
    commands.add_parser(
        "preflight",
        help="can a Serve config's replicas be placed on a cluster config?",
        add_help=False,
    )
    if argv and argv[0] == "preflight":
        from ray_cml_provider.llm.preflight import main as preflight_main

        return preflight_main(argv[1:])
    commands.add_parser(
        "prepare-model",
        help="convert the CPU twin's model once (run in .venv-vllm)",
        add_help=False,
    )
    if argv and argv[0] == "prepare-model":
        from ray_cml_provider.llm.prepare_model import main as prepare_main

        return prepare_main(argv[1:])
    if argv and argv[0] == "demo":
        from ray_cml_provider.demo import main as demo_main

        return demo_main(argv[1:])
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
