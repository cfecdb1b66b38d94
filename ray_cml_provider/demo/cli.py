"""``ray-cml demo``: the offline demos on the bundled CML emulator, from an installed package.

- (default) a Ray cluster that grows a GPU worker and gives it back (``ray_demo.py``);
- ``--llm``: the vLLM CPU twin served from zero and scaled back (``llm_demo.py``);
- ``--lifecycle``: only the emulator, one application's life (``lifecycle.py``).

The cluster YAMLs they use ship inside the package (``demo/configs``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_cml_provider.demo.local_cluster import DEMO_CONFIGS
from ray_cml_provider.llm import DEFAULT_MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray-cml demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEMO_CONFIGS / "local-emulator.yaml",
        help="cluster YAML for the emulator",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's own output too")
    parser.add_argument(
        "--lifecycle",
        action="store_true",
        help="only the emulator: one application created, run, stopped, deleted",
    )
    parser.add_argument(
        "--llm",
        action="store_true",
        help="the vLLM CPU twin served from zero and scaled back (needs make model)",
    )
    parser.add_argument(
        "--vllm-python",
        type=Path,
        default=Path(".venv-vllm/bin/python"),
        help="the Python of the vLLM environment (make vllm-env builds .venv-vllm)",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    if args.lifecycle:
        from ray_cml_provider.demo.lifecycle import main as lifecycle_main

        return lifecycle_main()
    try:
        if args.llm:
            from ray_cml_provider.demo.llm_demo import run_llm_demo

            return run_llm_demo(args.vllm_python, args.model)
        from ray_cml_provider.demo.ray_demo import run_ray_demo

        return run_ray_demo(args.config, args.verbose)
    except (TimeoutError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
