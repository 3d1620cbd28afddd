"""Record the file sizes of one real Hugging Face Trainer checkpoint (GPT-2 small, 124M
parameters, built in code, one AdamW step on CPU) for bench/bench_slim.py.

    python3 bench/record_hf_checkpoint.py [--python /work/fw-venv/bin/python]

Writes bench/data/hf-gpt2-small-checkpoint.json: each file's name and size, and the package
versions. Needs torch and transformers in that interpreter (the suite and the benchmark never
do: they read the JSON). About 1.5 GB of temporary disk, 20-30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE.parent / "tests" / "fixtures" / "hf_slim_run.py"
OUTPUT = HERE / "data" / "hf-gpt2-small-checkpoint.json"
GPT2_SMALL = ["--width", "768", "--layers", "12", "--heads", "12", "--vocab", "50257"]


def versions(python: str) -> dict[str, str]:
    code = (
        "import json, torch, transformers, safetensors; print(json.dumps({'torch': "
        "torch.__version__, 'transformers': transformers.__version__, 'safetensors': "
        "safetensors.__version__}))"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    found: dict[str, str] = json.loads(result.stdout)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="/work/fw-venv/bin/python")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptd-hf-") as folder:
        subprocess.run(
            [args.python, str(RUNNER), "train", folder, "--steps", "1", *GPT2_SMALL],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        checkpoint = Path(folder) / "checkpoint-1"
        files = {
            name: os.lstat(checkpoint / name).st_size for name in sorted(os.listdir(checkpoint))
        }
    document = {
        "name": "hf-gpt2-small-checkpoint",
        "source": "real: transformers.Trainer._save_checkpoint after one AdamW step "
        "(tests/fixtures/hf_slim_run.py train --steps 1 " + " ".join(GPT2_SMALL) + ")",
        "model": "GPT-2 small (124M parameters, fp32), built in code",
        "version": versions(args.python),
        "files": files,
    }
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {OUTPUT}: {sum(files.values()):,} bytes in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
