"""Compare two RLE result sets: strict and relaxed mIoU, mask count mismatches, masks per image.

    python compare_rle_lists.py baseline_rle_masks ao_rle_masks
    python compare_rle_lists.py results/baseline_bs1_ppb64 results/ao_bs1_ppb64 --json --per-image-csv per_image.csv

Each set is a file of one JSON per line (what `xargs ... curl -w "\\n" .../upload_rle` writes,
with or without `?format=coco`), a folder of per-image JSON files (paired by file name), or a
folder of reproduce_experiments.py (its rle_masks). Images whose request failed on either side
(an error answer, or an empty line) are left out and named. One set given twice, however spelt, is
refused: it would agree with itself fully. See sam2serve/compare.py for the metrics.
"""

import csv
import json
import sys
from pathlib import Path

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch (sam2serve.cli's): a stop then ends it in one line
    stop_in_one_line_while_importing()

from sam2serve.cli import ScriptParser, add_option, error_text, require_output_file, run_script
from sam2serve.compare import (
    compare_results, format_float, results_path, same_results, study_runs_differ, summarize,
)


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("reference", help="the reference results (usually the baseline's)")
    parser.add_argument("candidate", help="the results to compare with the reference")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    add_option(parser, "per_image_csv", help="also write one CSV row per image to this path")
    args = parser.parse_args(argv)
    for name in ("reference", "candidate"):
        if not getattr(args, name):  # an unset variable, say: not the current folder
            parser.error(f"{name}: empty; give a file or folder of results")
    # A set against itself agrees fully whatever it holds: a mistyped path would read as mIoU 1.0.
    # (The study compares its baseline with itself for the baseline's row: in code, not here.)
    if same_results(args.reference, args.candidate):
        given = args.reference if args.reference == args.candidate else f"{args.reference} and {args.candidate}"
        parser.error(f"the reference and the candidate are the same results ({given}): compared with themselves "
                     "they give mIoU 1.0 whatever they hold; give two result sets")
    if args.per_image_csv is not None:
        args.per_image_csv = require_output_file(parser, args.per_image_csv, "--per-image-csv",
                                                 inputs=[results_path(Path(given).expanduser())  # a row's rle_masks
                                                         for given in (args.reference, args.candidate)])
        if args.per_image_csv.exists():  # written in place: tried now, not after the comparison
            try:
                open(args.per_image_csv, "a").close()
            except OSError as error:
                parser.error(f"--per-image-csv {args.per_image_csv}: {error.strerror or error}")
    inputs, others = study_runs_differ(args.reference, args.candidate)
    if inputs:
        sys.exit(f"error: {args.reference} and {args.candidate} are study rows of runs on different inputs "
                 f"({', '.join(inputs)}); run the study again for both")
    if others:
        print(f"warning: the two study rows come from runs with other settings: {', '.join(others)}", file=sys.stderr)
    try:
        comparisons = compare_results(args.reference, args.candidate)
    except (OSError, ValueError) as error:  # unreadable input, JSON errors, unequal sets
        sys.exit(f"error: {error_text(error)}")
    if args.per_image_csv:
        try:
            write_per_image_csv(args.per_image_csv, comparisons)
        except OSError as error:
            sys.exit(f"error: --per-image-csv {args.per_image_csv}: {error.strerror or error}")
    summary = summarize(comparisons)
    if summary.failed:
        print(f"warning: left out, their request failed: {'; '.join(summary.failed[:10])}"
              + (f" and {len(summary.failed) - 10} more" if len(summary.failed) > 10 else ""), file=sys.stderr)
    print(json.dumps(summary.as_dict()) if args.json else summary.line())
    if not summary.images:
        sys.exit("error: no image to compare: every request failed on one side or the other")


def write_per_image_csv(path: Path, comparisons) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "reference_masks", "candidate_masks", "strict_iou", "relaxed_iou", "failed"])
        for c in comparisons:
            writer.writerow([c.name, c.reference_masks, c.candidate_masks,
                             format_float(c.strict_iou), format_float(c.relaxed_iou), c.failed])


if __name__ == "__main__":
    run_script(main)  # Ctrl-C in one line, as the other scripts
