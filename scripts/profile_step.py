"""Where one training step of a catalog model spends its CPU time (torch.profiler, per op, with input shapes).

    .venv/bin/python scripts/profile_step.py [--model cnn] [--batch 100] [--steps 10] [--channels-last]
                                             [--fresh-pages] [--compile]

The step is `parity bench`'s `eager` one: the plain module, cross-entropy, the recipe's Keras-semantics optimizer,
with glibc keeping freed memory as the port trains (`torch_impl.cpu_tuning.keep_freed_memory`; `--fresh-pages` to
leave glibc's defaults, under which every step's large activations come back as fresh pages).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fresh-pages", action="store_true", help="do not call keep_freed_memory()")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the module (inductor); its generated kernels appear as rows of their own")
    args = parser.parse_args()
    if not args.fresh_pages:
        from torch_impl.cpu_tuning import keep_freed_memory

        keep_freed_memory()

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from parity.catalog import get_spec, recipe_for
    from torch_impl.lightning_module import build_optimizer
    from torch_impl.models import build_member, model_logits

    recipe = recipe_for(args.model)
    member = build_member(args.model, seed=0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    member = member.to(memory_format=fmt)
    optimizer = build_optimizer(list(member.parameters()), recipe.optimizer, recipe.lr, recipe.epsilon)
    h, w, c = get_spec(get_spec(args.model).member or args.model).input_shape
    x = torch.rand(args.batch, c, h, w).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))

    def logits(images: torch.Tensor) -> torch.Tensor:
        return model_logits(member, images)

    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel is a profiler row
        logits = torch.compile(logits)

    def step() -> None:
        loss = F.cross_entropy(logits(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                             max_name_column_width=32, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
