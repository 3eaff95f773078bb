"""Hugging Face transformers as a peer: LlavaForConditionalGeneration, eager, float32, CPU, greedy.

Run as a script this is the measured process (it imports torch, so it runs
alone): `warmup` answers, then one timed one, printed as one JSON object.
TTFT runs from the model call on ready inputs (pixel values and ids, as the
runtime's starts at its vision graph) to the first token's logits; decode
tokens/s is the tokens after the first over the time from the first to the last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def available() -> str | None:
    """Why this peer cannot run here, or None."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True, help="the whole first-turn text, image token included")
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)

    import torch
    import transformers
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    inputs = processor(images=Image.open(args.image).convert("RGB"), text=args.prompt, return_tensors="pt")

    class Clock(LogitsProcessor):
        """Called once per new token, on its logits: the time each token became known."""

        def __init__(self):
            self.times: list[float] = []
            self.margins: list[float] = []  # top-1 minus top-2 logit: how close greedy was to a tie

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            top = torch.topk(scores[0], 2).values
            self.margins.append(float(top[0] - top[1]))
            return scores

    def answer() -> tuple[list[int], "Clock", float]:
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                                 logits_processor=LogitsProcessorList([clock]), pad_token_id=model.config.pad_token_id)
        return out[0, inputs["input_ids"].shape[1]:].tolist(), clock, t0

    for _ in range(args.warmup):
        answer()
    ids, clock, t0 = answer()
    times = clock.times
    decode_s = times[-1] - times[0]
    return {
        "token_ids": ids, "text": processor.tokenizer.decode(ids, skip_special_tokens=True),
        "top2_margins": clock.margins, "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "ttft_ms": (times[0] - t0) * 1e3, "decode_ms": decode_s * 1e3,
        "decode_tokens_per_s": (len(times) - 1) / decode_s if len(times) > 1 and decode_s > 0 else None,
        "peak_rss_bytes": _vm_hwm(), "threads": args.threads, "attn": "eager", "dtype": "float32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1:])))
