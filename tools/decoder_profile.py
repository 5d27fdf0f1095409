"""Where the fast modes' point decoder spends its time: the decoder as they compile it (static
shapes, every prompt's masks), timed whole and in its two halves, the two-way transformer with
the heads (predicted IoUs, mask tokens) and the mask logits (upscaling, hypernetworks), in both
of its forms (sam2serve.model.fusion_forms): the eager forms, and those written for Inductor's
fusion on a GPU (sums after products, the masks' read-out as a reduction). Random weights (the
time does not depend on them), features of a random image, random points.

    python -m tools.decoder_profile large --points 1024 --half     # as fast_furious on a GPU
    python -m tools.decoder_profile micro --points 64 --device cpu

Prints a table, a row per form as it ends (median ms of --calls calls after 3 untimed ones).
"""

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run by its path (python tools/decoder_profile.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import torch

from sam2serve import model as model_code
from sam2serve.checkpoints import MODEL_TYPE_CHOICES, build_random_model, model_size
from sam2serve.cli import (
    ScriptParser, add_device_option, compile_modes, positive_int, require_device, run_script, set_up_logging,
)
from sam2serve.fast import default_compile_mode, half_dtype, prepare_model
from sam2serve.model import FactoredPointDecoder, ImageEncoder
from sam2serve.timing import synchronize

# model.FUSION_FORMS_WHEN_COMPILED: where the forms written for Inductor's fusion are taken.
FORMS = {"fusion forms": {"cpu", "cuda"}, "eager forms": set()}


def median_ms(function: Callable, inputs: tuple, calls: int, device: str) -> float:
    for _ in range(3):  # compiles, then CUDA graphs' recording
        function(*inputs)
    times = []
    for _ in range(calls):
        synchronize(device)
        started = time.perf_counter()
        function(*inputs)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def parts(decoder: FactoredPointDecoder) -> tuple[Callable, Callable]:
    """The decoder's halves as functions of tensors: (features, coords) -> (IoUs, mask tokens,
    image tokens); (features, image tokens, mask tokens) -> mask logits."""
    def transformer_and_heads(image_embed, feat_s0, feat_s1, coords):
        tokens, image = decoder.transform(decoder.image_side(image_embed, feat_s0, feat_s1), coords)
        return (*decoder.heads(tokens), image)

    def mask_logits(image_embed, feat_s0, feat_s1, image, mask_tokens):
        return decoder.mask_logits(decoder.image_side(image_embed, feat_s0, feat_s1), image, mask_tokens)

    return transformer_and_heads, mask_logits


def main() -> None:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("model_type", choices=MODEL_TYPE_CHOICES, help="model size (random weights)")
    parser.add_argument("--points", type=positive_int, default=1024, help="prompts per decoder call")
    parser.add_argument("--half", action="store_true", help="half precision, as fast_furious")
    parser.add_argument("--compile-mode", choices=compile_modes(),
                        help="torch.compile's mode (default: the fast modes' for the device)")
    parser.add_argument("--calls", type=positive_int, default=10, help="timed calls per row")
    add_device_option(parser)
    args = parser.parse_args()
    require_device(parser, args.device)
    set_up_logging()
    torch.set_grad_enabled(False)
    model = build_random_model(model_size(args.model_type), seed=0, device=args.device)
    dtype = half_dtype(model.device) if args.half else torch.float32
    model = prepare_model(model, dtype)
    size = model.image_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, 3, size, size), generator=generator).to(model.device, dtype)
    features = ImageEncoder(model)(image)
    coords = (torch.rand((args.points, 2), generator=generator) * size).to(model.device)
    decoder = FactoredPointDecoder(model, multimask_output=True)
    transformer_and_heads, mask_logits = parts(decoder)
    _, mask_tokens, image_tokens = transformer_and_heads(*features, coords)
    # Inputs kept in place: else a CUDA graph copies each into its own buffer on every call
    # (the image tokens are 2 GB at 1024 prompts in float16), which the whole decoder never does.
    for tensor in (image_tokens, mask_tokens):
        torch._dynamo.mark_static_address(tensor)
    mode = args.compile_mode or default_compile_mode(args.device)
    print(f"SAM2.1 {args.model_type}, {str(dtype).removeprefix('torch.')}, {args.points} prompts per call, "
          f"torch.compile mode {mode}, {args.device}; ms per call, median of {args.calls}\n")
    print("| forms | whole decoder | transformer and heads | mask logits | s in all (compiling too) |")
    print("|---|---|---|---|---|", flush=True)
    for form, devices in FORMS.items():
        model_code.FUSION_FORMS_WHEN_COMPILED = devices
        torch._dynamo.reset()  # compiled anew in this form
        started = time.perf_counter()
        cells = [median_ms(torch.compile(function, mode=mode, fullgraph=True, dynamic=False), inputs, args.calls,
                           args.device)
                 for function, inputs in [(decoder, (*features, coords)),
                                          (transformer_and_heads, (*features, coords)),
                                          (mask_logits, (*features, image_tokens, mask_tokens))]]
        print(f"| {form} | {' | '.join(f'{ms:.2f}' for ms in cells)} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    run_script(main)
