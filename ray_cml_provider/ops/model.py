"""``ray-cml model``: the project's model cache (``llm/model_cache.py``).

    ray-cml model pull Qwen/Qwen2.5-7B-Instruct      # in a CML session: once per project
    ray-cml model pull ./my-model --project-dir DIR  # a folder; DIR: the emulator's project
    ray-cml model list

``pull`` prints the folder to give as ``model_source`` in the Serve config; every node of
every cluster of the project then loads the weights from there.
"""

from __future__ import annotations

import argparse
import sys

from ray_cml_provider.llm.model_cache import ModelCacheError, entries, fill, project_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray-cml model", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="put a model in the project's cache, once")
    pull.add_argument("source", help="a Hugging Face id (org/name), a local folder, or 'bundled'")
    pull.add_argument("--name", help="its name in the cache (default: from the source)")
    listing = commands.add_parser("list", help="the models in the project's cache")
    for sub in (pull, listing):
        sub.add_argument(
            "--project-dir",
            help="the project filesystem (default: /home/cdsw in a CML engine)",
        )
    args = parser.parse_args(argv)
    try:
        root = project_root(args.project_dir)
        if args.command == "list":
            for name, record in entries(root):
                size_gb = record.get("bytes", 0) / 1e9
                print(f"{name}\t{size_gb:.2f} GB\t{record['source']}\t{record['filled_at']}")
            return 0
        path, _ = fill(root, args.source, args.name, log=lambda m: print(m, file=sys.stderr))
    except (ModelCacheError, OSError) as exc:
        print(f"ray-cml model: {exc}", file=sys.stderr)
        return 1
    print(path)  # what model_source names
    return 0
