"""Training-step throughput of SiT vs SiT-ATConv (forward, backward, AdamW step), measured side by side.

    python benchmarks/bench_train.py                                  # S/2 at 256 px latents, batch 8, CPU
    python benchmarks/bench_train.py --models SiT-XL/2 SiT-ATConv-XL/2 --device cuda --batch 32 --bf16

The models train on random 32x32x4 latents with the flow-matching loss; steps are interleaved
round-robin so that drifts in machine speed hit every model alike. Reports the median step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sit_atconv.models import create_model
from sit_atconv.transport import Transport


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["SiT-S/2", "SiT-ATConv-S/2"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    transport = Transport()
    runs = {}
    for name in args.models:
        model = create_model(name, input_size=args.latent).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (model, optimizer)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step(model, optimizer):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = transport.loss(model, x, {"y": y}).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (model, optimizer) in runs.items():
            start = time.perf_counter()
            step(model, optimizer)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    print(f"| model | step ms (median) | steps/s | images/s |  (batch {args.batch}, {args.latent}x{args.latent}x4)")
    print("|---|---|---|---|")
    base = statistics.median(times[args.models[0]])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(
            f"| {name} | {1e3 * median:.0f} | {1 / median:.2f} | {args.batch / median:.1f} |"
            f" {base / median:.2f}x vs {args.models[0]}"
        )


if __name__ == "__main__":
    main()
