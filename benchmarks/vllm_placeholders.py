"""How vLLM reads a prompt that arrives as token ids with its image placeholders already expanded
(what TRL's colocate rollouts send: the trainer's processor's ids plus the image): the count of
image-pad tokens in the ids we send, in the prompt vLLM reports back, and in vLLM's own expansion
of a one-placeholder prompt, per model directory.

    python -m benchmarks.vllm_placeholders --out $OUT/vllm-placeholders-h100.json DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from egm.io import write_json


def check(model_dir: str) -> dict:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from egm.models.inputs import IMAGE_TOKEN
    from egm.train.processing import load_processor

    processor = load_processor(model_dir)
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    weights = any(Path(model_dir).glob("*.safetensors"))
    llm = LLM(model=model_dir, enforce_eager=True, gpu_memory_utilization=0.4, max_model_len=2048,
              load_format="auto" if weights else "dummy", enable_prefix_caching=False)
    out = {"model": model_dir, "weights": bool(weights)}
    for side in (96, 640):
        image = Image.fromarray((np.random.default_rng(0).random((side * 3 // 4 if side > 96 else side, side, 3)) * 255)
                                .astype("uint8"))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": "Locate the dog."}]}]
        expanded = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        expanded = list(expanded[0] if isinstance(expanded[0], list) else expanded)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        single = processor.tokenizer(text)["input_ids"]
        params = SamplingParams(max_tokens=1, temperature=0)
        got = {}
        for name, ids in (("expanded_ids", expanded), ("one_placeholder_ids", single)):
            try:
                result = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}], params,
                                      use_tqdm=False)[0]
                got[name] = {"sent": ids.count(pad), "vllm_prompt": list(result.prompt_token_ids).count(pad),
                             "sent_len": len(ids), "vllm_len": len(result.prompt_token_ids)}
            except Exception as error:  # noqa: BLE001 - recorded
                got[name] = {"sent": ids.count(pad), "error": f"{type(error).__name__}: {str(error)[:300]}"}
        out[f"image_{image.size[0]}x{image.size[1]}"] = got
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("dirs", nargs="+")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    write_json(args.out, {"vllm": vllm.__version__, "models": [check(d) for d in args.dirs]})
    print(args.out.read_text())


if __name__ == "__main__":
    main()
