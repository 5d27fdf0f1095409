"""Does AOTInductor work on this machine? A small module (a convolution, attention, a linear
layer, with weights) exported to a package, loaded in a process of its own, then here, and run
against its eager self. Where the fast modes' exported kernels cannot be loaded (torch's loader
crashed on an H200 with torch 2.11: docs/gpu-h200.md), this tells torch's loader on this machine
from the project's kernels, in seconds.

    python -m tools.aoti_check                 # CUDA where there is a GPU, else the CPU
    python -m tools.aoti_check --device cpu

Prints a table, a row as each step ends; exits 1 if a step failed.
"""

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

if not __package__:  # run by its path (python tools/aoti_check.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import torch
from torch import nn

from sam2serve.cli import ScriptParser, add_device_option, require_device, run_script
from sam2serve.fast import aoti_device_index, load_failure_elsewhere
from sam2serve.protocol import first_line


class SmallModule(nn.Module):
    """The kinds of operations the fast modes' kernels hold, at a toy size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, kernel_size=4, stride=4)
        self.attention = nn.MultiheadAttention(32, num_heads=4, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(image).flatten(2).transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(attended + tokens)


def described(error: Exception) -> str:
    return f"{type(error).__name__}: {first_line(error, 200)}"


def steps(device: torch.device, folder: Path) -> Iterator[tuple[str, str, bool]]:
    """(step, what happened, passed), each as it ends: export, the load in a process of its own,
    the load here and the run against eager. A step that fails ends the check; one that crashes
    this process leaves the rows before it printed."""
    torch.manual_seed(0)
    module = SmallModule().to(device).eval()
    image = torch.randn(1, 3, 64, 64, device=device)
    package = folder / "small.pt2"
    started = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (image,), strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
    except Exception as error:  # what failed is the answer
        yield "export (torch.export + AOTInductor)", described(error), False
        return
    yield ("export (torch.export + AOTInductor)",
           f"{time.perf_counter() - started:.1f} s, {package.stat().st_size / 2**20:.1f} MiB", True)
    started = time.perf_counter()
    why = load_failure_elsewhere([package], aoti_device_index(device))
    yield "load in a process of its own", why or f"loaded, {time.perf_counter() - started:.1f} s", why is None
    if why:
        return
    try:
        loaded = torch._inductor.aoti_load_package(str(package), device_index=aoti_device_index(device))
    except Exception as error:
        yield "load here", described(error), False
        return
    yield "load here", "loaded", True
    with torch.no_grad():
        difference = (loaded(image) - module(image)).abs().max().item()
    tolerance = 1e-3 if device.type == "cuda" else 1e-4  # TF32 and other kernels on a GPU
    yield "run against eager", f"largest difference {difference:.2e} (at most {tolerance:g})", difference <= tolerance


def main() -> None:
    parser = ScriptParser(description=__doc__)
    add_device_option(parser)
    args = parser.parse_args()
    require_device(parser, args.device)
    device = torch.device(args.device)
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"AOTInductor on {described}, torch {torch.__version__}\n")
    print("| step | result | passed |\n|---|---|---|", flush=True)
    passed = []
    with tempfile.TemporaryDirectory(prefix="aoti-check-") as folder:
        for step, result, ok in steps(device, Path(folder)):
            print(f"| {step} | {result} | {'yes' if ok else 'no'} |", flush=True)
            passed.append(ok)
    sys.exit(0 if len(passed) == 4 and all(passed) else 1)


if __name__ == "__main__":
    run_script(main)  # a time limit's SIGTERM removes the folder and ends the tryout too
