"""Training-step throughput of SiT vs SiT-ATConv (forward, backward, fused AdamW step), measured side by side.

    python benchmarks/bench_train.py                                  # S/2 at 256 px latents, batch 8, CPU
    python benchmarks/bench_train.py --compile                        # also torch.compile'd forward + loss
    python benchmarks/bench_train.py --models SiT-XL/2 SiT-ATConv-XL/2 --device cuda --batch 32 --bf16

The models train on random 32x32x4 latents with the flow-matching loss, as the trainer does (fused AdamW;
with --compile the forward and loss compiled, as train.compile does); steps are interleaved round-robin so
that drifts in machine speed hit every variant alike. Reports the median step time and, for compiled
variants, the first step (compilation included).
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
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd forward + loss")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    transport = Transport()

    def forward_loss(model, x, y):
        return transport.loss(model, x, {"y": y}).mean()

    runs = {}
    for name in args.models:
        for compiled in (False, True) if args.compile else (False,):
            model = create_model(name, input_size=args.latent).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            loss_fn = torch.compile(forward_loss) if compiled else forward_loss
            runs[f"{name}{' compiled' if compiled else ''}"] = (model, optimizer, loss_fn)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step(model, optimizer, loss_fn):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in runs}
    first = {}
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            start = time.perf_counter()
            step(*run)
            elapsed = time.perf_counter() - start
            if i == 0:
                first[name] = elapsed
            if i >= args.warmup:
                times[name].append(elapsed)

    print(f"| variant | step ms (median) | steps/s | images/s | vs {args.models[0]} | first step s |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(times[args.models[0]])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(
            f"| {name} | {1e3 * median:.0f} | {1 / median:.2f} | {args.batch / median:.1f} | {base / median:.2f}x |"
            f" {first[name]:.1f} |"
        )
    print(
        f"(batch {args.batch}, {args.latent}x{args.latent}x4 latents, {args.device}, {'bf16' if args.bf16 else 'fp32'})"
    )


if __name__ == "__main__":
    main()
