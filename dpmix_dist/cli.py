"""dpmix: one command for the toolkit; each subcommand runs the same code as its launch/ script.

    dpmix finetune --config fmnist_effnet_lite0 --plan        # the guarantee and a time estimate, nothing trained
    dpmix finetune --config fmnist_effnet_lite0               # = python launch/finetune.py ...
    dpmix predict --model runs/RUN image.png                  # top-5 classes of an image
    accelerate launch -m dpmix_dist.cli finetune --config NAME   # several processes: accelerate runs this module

`dpmix SUBCOMMAND --help` explains each one.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, its launch/ script, one line for `dpmix --help`)
COMMANDS = {
    "finetune": ("dpmix_dist.commands.finetune", "main", "finetune.py", "private fine-tuning (--plan: plan only)"),
    "prepare": ("dpmix_dist.commands.prepare", "main", "prepare_data.py", "write a data set as shards"),
    "generate": ("dpmix_dist.commands.generate", "main", "generate.py", "render synthetic images (DP-Mix_Diff)"),
    "train-generator": (
        "dpmix_dist.commands.train_generator",
        "main",
        "train_diffusion.py",
        "train the diffusion generator on public images",
    ),
    "sweep": ("dpmix_dist.sweep", "run_from_command_line", "sweep.py", "accuracy against ε (--plan: plan only)"),
    "audit": ("dpmix_dist.commands.audit", "main", "audit.py", "one-run privacy audit"),
    "predict": ("dpmix_dist.commands.predict", "main", "predict.py", "top-k classes of images from a private model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}  (launch/{script})" for name, (_, _, script, help_) in COMMANDS.items()]
    return f"usage: dpmix SUBCOMMAND [ARGS...]\n\n{__doc__}\nsubcommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `dpmix NAME ARGS...` to NAME's command with ARGS (as sys.argv, so its --help reads `dpmix NAME`)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown subcommand {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _, _ = COMMANDS[name]
    sys.argv = [f"dpmix {name}", *rest]  # the commands parse sys.argv (the sweep's entry point reads it itself)
    return getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    sys.exit(main())
