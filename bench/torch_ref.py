"""Reference timing: the same ResNet-32 in PyTorch (eager), trained with Adam.

    .venv/bin/python bench/torch_ref.py --steps 60 --warmup 10 --precision bf16 --json

The network is resnet-graph's "original" ResNet-32 for CIFAR-10 (post-activation,
option A shortcuts, 464,154 parameters). The loop trains on 5,000 random images held
in memory (consecutive batches of 100, sliced from one tensor), ``warmup`` untimed
steps then ``steps`` timed ones; a step is zero_grad, forward, cross-entropy,
backward and Adam's update. ``bf16`` runs forward and loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``; weights and their gradients stay
float32. CPU work in PyTorch is synchronous, so the wall clock around the loop is
the time of the steps.
"""

import json
import os
import sys
import time

from common import (
    EXPECTED_PARAMS,
    NUM_CLASSES,
    STAGE_FILTERS,
    check_training_args,
    cpu_name,
    training_parser,
)


def parse_args(argv=None):
    p = training_parser(__doc__.split("\n\n")[0])
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"),
                   default="channels_last",
                   help="layout of the images and weights: channels_last (NHWC in memory, "
                        "oneDNN's preferred layout on a CPU) or contiguous (NCHW)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: os.cpu_count())")
    p.add_argument("--num-images", type=int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return check_training_args(p, p.parse_args(argv))


def build_model(torch, depth, channels_last):
    nn, F = torch.nn, torch.nn.functional
    n = (depth - 2) // 6

    def conv(cin, cout, stride):
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def bn(c):
        # PyTorch's momentum weighs the new batch: 0.1 here is Keras'/TF's 0.9.
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, cout, stride), bn(cout)
            self.conv2, self.bn2 = conv(cout, cout, 1), bn(cout)
            self.stride, self.extra = stride, cout - cin

        def shortcut(self, x):
            # Option A: every stride-th pixel, channels zero-padded half before, half after.
            if self.stride > 1:
                x = x[:, :, ::self.stride, ::self.stride]
            if self.extra:
                x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            return x

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem_conv, self.stem_bn = conv(3, STAGE_FILTERS[0], 1), bn(STAGE_FILTERS[0])
            blocks, cin = [], STAGE_FILTERS[0]
            for stage, cout in enumerate(STAGE_FILTERS):
                for b in range(n):
                    blocks.append(Block(cin, cout, 2 if (stage > 0 and b == 0) else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, NUM_CLASSES)
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)  # Glorot uniform, as Keras/TF
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, x):
            x = F.relu(self.stem_bn(self.stem_conv(x)))
            x = self.blocks(x)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    channels_last = args.memory_format == "channels_last"
    model = build_model(torch, args.depth, channels_last)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.depth == 32:
        assert params == EXPECTED_PARAMS, \
            f"{params} trainable parameters, expected {EXPECTED_PARAMS}"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    generator = torch.Generator().manual_seed(args.seed)
    num_images = max(args.num_images, args.batch_size)
    images = torch.randn(num_images, 3, 32, 32, generator=generator).contiguous(memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=generator)
    per_epoch = num_images // args.batch_size
    bf16 = args.precision == "bf16"

    def step(i):
        j = (i % per_epoch) * args.batch_size
        x, y = images[j:j + args.batch_size], labels[j:j + args.batch_size]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    seconds = time.perf_counter() - start

    result = {
        "framework": "pytorch",
        "framework_version": f"torch {torch.__version__}",
        "model": "original", "depth": args.depth, "batch_size": args.batch_size,
        "precision": args.precision,
        "data_format": "NHWC (channels_last)" if channels_last else "NCHW",
        "xla": False, "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "params": params,
        "steps": args.steps, "warmup": args.warmup, "seconds": seconds,
        "images_per_sec": args.steps * args.batch_size / seconds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pytorch original-{args.depth} batch {args.batch_size} {args.precision} "
              f"{result['data_format']}: {result['images_per_sec']:.1f} images/s "
              f"({params:,} parameters, {result['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
