"""Where a decoding step's time goes on a GPU: the profiler's view of the full cache and of snapkv@512.

    python benchmarks/gpu_decode_profile.py

An 8B-shaped model (random bf16 weights), batch 8, 32k-token prompts prefilled in chunks of 4k,
then 8 profiled decoding steps per spec, both through polykv (``layers *: full`` and
``layers *: snapkv@512``). Prints the profiler's tables by GPU time and by host time; the kept run
is benchmarks/results/gpu_decode_profile_H100.txt.
"""

import time

import torch
from gpu_speed import CHUNK, prefill
from shapes import llama_8b
from torch.profiler import ProfilerActivity, profile

import polykv
from polykv.model.describe import cache_argument


def main() -> None:
    model = llama_8b()
    ids = torch.randint(1, 128000, (8, 32768), generator=torch.Generator().manual_seed(0)).cuda()
    for spec in ["layers *: full", "layers *: snapkv@512"]:
        cache = prefill(model, polykv.compile(spec, model), ids, chunk=CHUNK)
        with torch.no_grad():
            tok = torch.ones(8, 1, dtype=torch.long, device="cuda")
            for _ in range(4):
                tok = model(tok, **cache_argument(model, cache)).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(8):
                    tok = model(tok, **cache_argument(model, cache)).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
            step_ms = (time.perf_counter() - t) / 8 * 1000
            print(f"{spec} {step_ms:.1f} ms/step (profiled) on {torch.cuda.get_device_name(0)}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
