"""compare_rle_lists.py on crafted result sets whose answers are known by hand."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pycocotools import mask as mask_utils
from sam2.utils.amg import coco_encode_rle

from sam2serve.compare import compare_image, compare_results, load_results, masks_of, summarize
from sam2serve.rle import counts_from_string, masks_to_rle_vectorized

REPO = Path(__file__).resolve().parents[1]
H, W = 8, 8


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    return mask


def answer(*masks: np.ndarray) -> dict:
    """What /upload_rle would answer with these masks."""
    rles = masks_to_rle_vectorized(torch.from_numpy(np.stack(masks))) if masks else []
    return {f"mask_{i}": rle for i, rle in enumerate(rles)}


SQUARE = box(0, 0, 4, 4)  # 16 pixels
OTHER = box(4, 4, 8, 8)
SHIFTED_SQUARE = box(1, 0, 5, 4)  # overlaps SQUARE in 12 pixels, union 20: IoU 0.6
LEFT_HALF, RIGHT_HALF = box(0, 0, 4, 2), box(0, 2, 4, 4)  # SQUARE split in two
EMPTY = np.zeros((H, W), bool)


def iou_of(reference: list[np.ndarray], candidate: list[np.ndarray]):
    c = compare_image("x", list(answer(*reference).values()), list(answer(*candidate).values()))
    return c.strict_iou, c.relaxed_iou


def test_known_answers():
    assert iou_of([SQUARE, OTHER], [SQUARE, OTHER]) == (1.0, 1.0)
    assert iou_of([SQUARE, OTHER], [OTHER, SQUARE]) == (1.0, 1.0)  # matched by overlap, not rank
    assert iou_of([SQUARE], [SHIFTED_SQUARE]) == pytest.approx((0.6, 0.6))
    # One extra mask: a mismatch in strict mode; relaxed (1 + 1 + 0) / 3.
    assert iou_of([SQUARE, OTHER], [SQUARE, OTHER, SHIFTED_SQUARE]) == pytest.approx((None, 2 / 3))
    # A split mask: the best half has IoU 0.5, the other half is unmatched: 0.5 / 2.
    assert iou_of([SQUARE], [LEFT_HALF, RIGHT_HALF]) == pytest.approx((None, 0.25))
    # Empty masks and images without masks agree fully, never NaN.
    assert iou_of([EMPTY], [EMPTY]) == (1.0, 1.0)
    assert iou_of([], []) == (1.0, 1.0)
    assert iou_of([SQUARE], []) == (None, 0.0)


def test_images_of_hundreds_of_masks_compare():
    """An image of 256 masks or more (loose filters give thousands) ended the comparison in an
    OverflowError: pycocotools' area of that many masks at once."""
    rng = np.random.default_rng(0)
    masks = list(rng.random((300, H, W)) < 0.3) + [EMPTY]
    shuffled = [masks[i] for i in rng.permutation(len(masks))]
    assert iou_of(masks, shuffled) == (1.0, 1.0)
    worse = [*masks[:-2], SQUARE]  # one mask fewer, the last two one SQUARE
    strict, relaxed = iou_of(masks, worse)
    assert strict is None and relaxed < 1.0


def test_counts_with_empty_runs_compare_as_the_same_masks():
    """Counts may hold runs of 0 pixels (another encoder's): pycocotools' IoU stopped at one that
    both masks had, and a mask against itself scored 0."""
    from sam2serve.compare import without_empty_runs

    square = answer(SQUARE)["mask_0"]  # counts [0, 4, 4, 4, 4, 4, 4, 4, 36]: starts with its pixels
    padded = {"size": [H, W], "counts": [0, 0, 0, 2, 0, 2, 4, 4, 0, 0, 4, 4, 4, 4, 36, 0]}  # the same pixels
    assert without_empty_runs(padded) == square
    for reference, candidate in ((padded, padded), (square, padded), (padded, square)):
        comparison = compare_image("x", [reference], [candidate])
        assert (comparison.strict_iou, comparison.relaxed_iou) == (1.0, 1.0)
    doubled = {"size": [1, 6], "counts": [2, 0, 0, 4]}  # 2 off, 0 on, 0 off, 4 on
    assert without_empty_runs(doubled)["counts"] == [2, 4]
    assert without_empty_runs({"size": [1, 6], "counts": [0, 0, 2, 0, 4]})["counts"] == [6]


def write_lines(path: Path, answers: list[dict]) -> Path:
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return path


def run_tool(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "compare_rle_lists.py"), *map(str, arguments)],
                          capture_output=True, text=True, timeout=120)


REFERENCE = [answer(SQUARE, OTHER), answer(SQUARE), answer(), answer(SQUARE)]
CANDIDATE = [answer(OTHER, SQUARE), answer(LEFT_HALF, RIGHT_HALF), answer(), answer(SHIFTED_SQUARE)]
# Strict: images 1, 3, 4 -> (1 + 1 + 0.6) / 3; relaxed: (1 + 0.25 + 1 + 0.6) / 4.
EXPECTED = {"miou": 2.6 / 3, "relaxed_miou": 2.85 / 4, "mask_count_mismatch": 1, "images": 4,
            "masks_per_image": 5 / 4, "reference_masks_per_image": 4 / 4, "failed": 0}


def test_line_files_json_and_per_image_csv(tmp_path):
    reference = write_lines(tmp_path / "reference", REFERENCE)
    candidate = write_lines(tmp_path / "candidate", CANDIDATE)
    result = run_tool(reference, candidate, "--json", "--per-image-csv", tmp_path / "per_image.csv")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == pytest.approx(EXPECTED)
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert [row["candidate_masks"] for row in rows] == ["2", "2", "0", "1"]
    assert rows[1]["strict_iou"] == "" and float(rows[1]["relaxed_iou"]) == pytest.approx(0.25)

    summary = run_tool(reference, candidate).stdout
    assert "mask count mismatch 1" in summary and "images 4" in summary


def coco_answer(masks_answer: dict) -> list[dict]:
    """What /upload_rle?format=coco would answer with these masks: annotations whose segmentation
    is the compressed RLE that sam2 writes (other fields left out: the comparison reads none)."""
    return [{"segmentation": coco_encode_rle(rle)} for rle in masks_answer.values()]


def test_coco_annotation_lines_compare_as_mask_answers(tmp_path):
    """`?format=coco` lines (compressed RLE in a list) give the same figures as /upload_rle's,
    on either side and mixed."""
    reference = write_lines(tmp_path / "reference", REFERENCE)
    candidate = write_lines(tmp_path / "candidate", [coco_answer(a) for a in CANDIDATE])
    assert isinstance(json.loads(candidate.read_text().splitlines()[0])[0]["segmentation"]["counts"], str)
    for pair in ((reference, candidate), (candidate, reference)):
        result = run_tool(*pair, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["mask_count_mismatch"] == 1
    result = run_tool(reference, candidate, "--json")
    assert json.loads(result.stdout) == pytest.approx(EXPECTED)


@pytest.mark.parametrize("size", [(8, 8), (37, 53), (300, 400)])
def test_compressed_counts_are_read_as_pycocotools_writes_them(size):
    """Every run length pycocotools' encoder writes, short and long (several 5-bit groups),
    growing and shrinking (the differences to the run two before are negative), first pixel set
    or not, comes back as the uncompressed counts of the same masks."""
    generator = np.random.default_rng(0)
    h, w = size
    masks = [np.zeros((h, w), bool), np.ones((h, w), bool), generator.random((h, w)) < 0.5]
    for _ in range(6):  # rectangles of every scale: runs from 1 pixel to most of the image
        mask = np.zeros((h, w), bool)
        for _ in range(generator.integers(1, 6)):
            top, left = generator.integers(0, h), generator.integers(0, w)
            mask[top:top + generator.integers(1, h + 1), left:left + generator.integers(1, w + 1)] = True
        masks.append(mask)
    masks[-1][0, 0] = True
    stacked = np.stack(masks)
    expected = masks_to_rle_vectorized(torch.from_numpy(stacked))
    encoded = mask_utils.encode(np.asfortranarray(np.moveaxis(stacked, 0, -1).astype(np.uint8)))
    for rle, compressed in zip(expected, encoded):
        assert counts_from_string(compressed["counts"].decode()) == rle["counts"]


def test_folders_are_paired_by_file_name(tmp_path):
    for folder, answers in (("reference", REFERENCE), ("candidate", CANDIDATE)):
        (tmp_path / folder).mkdir()
        # Written in a shuffled order: pairing must not depend on the listing order.
        for index in (2, 0, 3, 1):
            (tmp_path / folder / f"image_{index}.json").write_text(json.dumps(answers[index]))
    result = run_tool(tmp_path / "reference", tmp_path / "candidate", "--json")
    assert json.loads(result.stdout) == pytest.approx(EXPECTED)

    (tmp_path / "candidate" / "image_3.json").rename(tmp_path / "candidate" / "image_9.json")
    result = run_tool(tmp_path / "reference", tmp_path / "candidate")
    assert result.returncode != 0 and "different files" in result.stderr
    # File names on one side, line numbers on the other: nothing to pair them by.
    with pytest.raises(ValueError, match="pairs only with another such folder"):
        compare_results(tmp_path / "reference", write_lines(tmp_path / "lines", REFERENCE))
    # Said so too where their image counts differ (which was said instead, with a hint for line files).
    with pytest.raises(ValueError, match="pairs only with another such folder"):
        compare_results(tmp_path / "reference", write_lines(tmp_path / "lines", REFERENCE[:2]))
    (tmp_path / "candidate" / "image_9.json").unlink()
    with pytest.raises(ValueError, match=r"different files: \['image_3.json'\]"):
        compare_results(tmp_path / "reference", tmp_path / "candidate")


def test_an_empty_per_image_file_is_a_failed_request(tmp_path):
    """What `curl ... > name.json` leaves when it cannot connect, as an empty line in a line file."""
    for folder, answers in (("reference", REFERENCE), ("candidate", CANDIDATE)):
        (tmp_path / folder).mkdir()
        for index, answer_ in enumerate(answers):
            (tmp_path / folder / f"image_{index}.json").write_text(json.dumps(answer_))
    (tmp_path / "candidate" / "image_1.json").write_text("")
    comparisons = compare_results(tmp_path / "reference", tmp_path / "candidate")
    assert [c.failed for c in comparisons] == ["", "candidate", "", ""]
    assert summarize(comparisons).as_dict()["miou"] == pytest.approx(2.6 / 3)  # images 1, 3, 4


def test_study_rows_of_other_image_paths_pair_line_by_line(tmp_path):
    """Study rows' folders (rle_masks, and stats.json naming the images) made on other machines,
    or a folder with rle_masks alone (as modal_experiments.sh writes), pair by line, not by name."""
    rows = []
    for name, answers, images in (("here", REFERENCE, ["/data/a.jpg"] * 4), ("there", CANDIDATE, ["/mnt/a.jpg"] * 4),
                                  ("modal", CANDIDATE, None)):
        (tmp_path / name).mkdir()
        write_lines(tmp_path / name / "rle_masks", answers)
        if images:
            (tmp_path / name / "stats.json").write_text(json.dumps({"settings": {"images": images}}))
        rows.append(tmp_path / name)
    for candidate in rows[1:]:
        assert summarize(compare_results(rows[0], candidate)).as_dict() == pytest.approx(EXPECTED)


def test_the_per_image_csv_may_not_replace_a_rows_masks(tmp_path):
    """The rows were checked as folders: --per-image-csv ROW/rle_masks replaced the masks it read."""
    for name, answers in (("reference", REFERENCE), ("candidate", CANDIDATE)):
        (tmp_path / name).mkdir()
        write_lines(tmp_path / name / "rle_masks", answers)
    for row in ("reference", "candidate"):
        result = run_tool(tmp_path / "reference", tmp_path / "candidate", "--per-image-csv", tmp_path / row / "rle_masks")
        assert result.returncode == 2 and "that is an input file; the output would replace it" in result.stderr
    assert (tmp_path / "candidate" / "rle_masks").read_text() == "".join(json.dumps(a) + "\n" for a in CANDIDATE)


def test_study_rows_of_runs_on_other_inputs_are_refused_and_other_settings_named(tmp_path):
    """A rerun of the study with other settings leaves the rows it did not run, made with the
    earlier ones: the README's compare command paired a 4x4 baseline with an 8x8 fast row."""
    settings = {"row": {"mode": "baseline"}, "checkpoint": "micro@1234", "model_type": "micro", "device": "cpu",
                "amg": {"points_per_side": 4, "points_per_batch": 64}, "images": ["/data/a.jpg"] * 4,
                "image_contents": "abcd"}

    def row(name: str, answers: list[dict], **changes) -> Path:
        (tmp_path / name).mkdir()
        write_lines(tmp_path / name / "rle_masks", answers)
        (tmp_path / name / "stats.json").write_text(json.dumps({"settings": {**settings, **changes}}))
        return tmp_path / name / "rle_masks"

    baseline = row("baseline", REFERENCE)
    same_run = row("fast", CANDIDATE, row={"mode": "fast"}, amg={"points_per_side": 4, "points_per_batch": 1024},
                   images=["/mnt/a.jpg"] * 4)  # what differs from row to row, or machine to machine
    result = run_tool(baseline, same_run)
    assert result.returncode == 0 and result.stderr == ""
    other_grid = row("ao", CANDIDATE, amg={"points_per_side": 8, "points_per_batch": 64})
    result = run_tool(baseline, other_grid.parent)
    assert result.returncode == 0 and "other settings: points_per_side 4 -> 8" in result.stderr
    other_images = row("fast_furious", CANDIDATE, image_contents="ef01")
    result = run_tool(baseline, other_images)
    assert result.returncode == 1 and "runs on different inputs (the images' contents)" in result.stderr


def test_different_image_counts_are_an_error(tmp_path):
    reference = write_lines(tmp_path / "reference", REFERENCE)
    candidate = write_lines(tmp_path / "candidate", CANDIDATE[:3])
    result = run_tool(reference, candidate)
    assert result.returncode != 0 and "4 images" in result.stderr and "3" in result.stderr


def test_failed_requests_are_left_out_and_named_keeping_lines_paired(tmp_path):
    """An error answer, or the empty line curl -w "\\n" writes when it cannot connect, is a failed
    request: its image is left out on both sides, and the other lines stay paired with theirs."""
    reference = tmp_path / "reference"
    reference.write_text("\n".join([json.dumps(answer(SQUARE)), "", json.dumps(answer(OTHER)),
                                    json.dumps(answer(SQUARE)), json.dumps(answer(OTHER))]) + "\n")
    candidate = write_lines(tmp_path / "candidate", [answer(SQUARE), answer(OTHER), answer(OTHER), answer(SQUARE),
                                                     {"error": "the file is empty"}])
    result = run_tool(reference, candidate, "--json", "--per-image-csv", tmp_path / "per_image.csv")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["failed"], summary["miou"], summary["relaxed_miou"]) == (3, 2, 1.0, 1.0)
    assert "line 2: reference" in result.stderr and "line 5: candidate" in result.stderr
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert [row["failed"] for row in rows] == ["", "reference", "", "", "candidate"]
    assert "left out 2 whose request failed (line 2: reference, line 5: candidate)" in run_tool(reference, candidate).stdout


def test_a_folder_without_results_or_a_device_is_refused_with_why(tmp_path):
    reference = write_lines(tmp_path / "reference", REFERENCE[:1])
    (tmp_path / "empty").mkdir()
    result = run_tool(reference, tmp_path / "empty")
    assert result.returncode == 1 and "empty is a folder without .json files" in result.stderr
    result = run_tool(reference, "/dev/zero")  # was read until memory ran out
    assert result.returncode == 1 and "/dev/zero is a device, not a file of results" in result.stderr


def test_no_image_to_compare_is_an_error(tmp_path):
    reference = write_lines(tmp_path / "reference", REFERENCE[:1])
    candidate = write_lines(tmp_path / "candidate", [{"error": "the file is empty"}])
    result = run_tool(reference, candidate)
    assert result.returncode == 1 and "no image to compare" in result.stderr and "line 1: candidate" in result.stderr


def test_masks_of_another_size_name_both_sets_and_say_they_hold_other_images(tmp_path):
    """Results of two image lists (or of one in two orders) paired line by line: the error named
    neither file ("line 2: mask sizes differ: [8, 8] against [6, 10]")."""
    wide = np.zeros((6, 10), bool)
    wide[1:3, 2:7] = True
    reference = write_lines(tmp_path / "reference", REFERENCE[:3])
    candidate = write_lines(tmp_path / "candidate", [CANDIDATE[0], answer(wide), CANDIDATE[2]])
    result = run_tool(reference, candidate)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: line 2: the masks are 8 x 8 in {reference}, 6 x 10 in {candidate}: these seem "
                             "to be results of different images (or of the same ones in another order)\n")
    # The same image turned on one side (its EXIF orientation applied there only): said too.
    tall, turned = np.zeros((8, 6), bool), np.zeros((6, 8), bool)
    tall[1:3, 1:4] = turned[1:4, 1:3] = True
    turned_result = run_tool(write_lines(tmp_path / "tall", [answer(tall)]),
                             write_lines(tmp_path / "turned", [answer(turned)]))
    assert turned_result.stderr.endswith(
        "(or of the same ones in another order); or of one image turned, its EXIF orientation applied on one "
        "side only\n")
    # Folders of per-image files pair by name: no order to get wrong.
    for folder, answers in (("reference_images", REFERENCE[:1]), ("candidate_images", [answer(wide)])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.json").write_text(json.dumps(answers[0]))
    with pytest.raises(ValueError) as error:
        compare_results(tmp_path / "reference_images", tmp_path / "candidate_images")
    assert str(error.value) == (f"a.json: the masks are 8 x 8 in {tmp_path / 'reference_images'}, 6 x 10 in "
                                f"{tmp_path / 'candidate_images'}: these seem to be results of different images")


def test_an_empty_name_is_refused_not_read_as_the_current_folder(tmp_path):
    reference = write_lines(tmp_path / "reference", REFERENCE)
    for arguments, name in (([reference, ""], "candidate"), (["", reference], "reference"), (["", ""], "reference")):
        result = run_tool(*arguments)
        assert result.returncode == 2 and result.stderr.endswith(f"error: {name}: empty; give a file or folder of "
                                                                 "results\n"), result.stderr


def test_the_same_results_twice_are_refused_however_spelt(tmp_path, monkeypatch, capsys):
    """Results against themselves give mIoU 1.0 whatever they hold: a mistyped path printed perfect
    agreement, with status 0."""
    from compare_rle_lists import main

    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "reference", REFERENCE)
    Path("link").symlink_to("reference")
    Path("row").mkdir()
    write_lines(tmp_path / "row" / "rle_masks", REFERENCE)
    for pair in (("reference", "reference"), ("reference", "./reference"), ("link", "reference"),
                 ("row", "row/rle_masks")):
        with pytest.raises(SystemExit) as exit_:
            main(list(pair))
        out, err = capsys.readouterr()
        given = pair[0] if pair[0] == pair[1] else f"{pair[0]} and {pair[1]}"
        assert exit_.value.code == 2 and out == "" and err.endswith(
            f"error: the reference and the candidate are the same results ({given}): compared with themselves they "
            "give mIoU 1.0 whatever they hold; give two result sets\n")
    # A copy is other results that agree (a rerun that gave the same masks): compared.
    write_lines(tmp_path / "copy", REFERENCE)
    main(["reference", "copy"])
    assert "mIoU 1.000000" in capsys.readouterr().out


def test_the_study_results_folder_is_refused_naming_its_rows(tmp_path):
    """reproduce_experiments.py's output folder given for one of its rows: its rows are named."""
    for row in ("ao_bs1_ppb64", "baseline_bs1_ppb64", "fast_bs1_ppb64", "fast_furious_bs1_ppb64", "half_bs1_ppb64"):
        (tmp_path / row).mkdir()
        write_lines(tmp_path / row / "rle_masks", REFERENCE)
        (tmp_path / row / "stats.json").write_text(json.dumps({"settings": {"images": ["a.jpg"] * 4}}))
    (tmp_path / "result.csv").write_text("mode,miou\n")
    (tmp_path / "stopped_bs1_ppb64").mkdir()  # a row stopped in its first images: not a row
    (tmp_path / "stopped_bs1_ppb64" / "rle_masks.partial").write_text("")
    with pytest.raises(ValueError) as error:
        compare_results(tmp_path / "baseline_bs1_ppb64", tmp_path)
    assert str(error.value) == (f"{tmp_path} holds the study's rows (ao_bs1_ppb64, baseline_bs1_ppb64, "
                                "fast_bs1_ppb64, fast_furious_bs1_ppb64 and 1 more), not one set of results; give one "
                                f"of them, e.g. {tmp_path / 'baseline_bs1_ppb64'}")


def test_one_json_document_over_lines_is_named_as_such(tmp_path):
    """A pretty-printed file (`python -m json.tool`'s, or a study row's stats.json) given as a
    list of answers: its first line was "not JSON: Expecting property name"."""
    from sam2serve.compare import load_results

    pretty = tmp_path / "pretty answer.json"
    pretty.write_text(json.dumps(REFERENCE[0], indent=4))
    with pytest.raises(ValueError) as error:
        load_results(pretty)
    assert str(error.value) == (
        f"{pretty} is one JSON document spread over {len(pretty.read_text().splitlines())} lines, where one answer "
        f"per line is expected; put this one answer on one line: jq -c . '{pretty}' > one_line.json "
        f"(or python -m json.tool --compact '{pretty}' > one_line.json)")
    pretty.write_text("\n" + json.dumps(REFERENCE[0], indent=4))  # a blank line first: the same
    with pytest.raises(ValueError, match="is one JSON document spread over"):
        load_results(pretty)
    (tmp_path / "row").mkdir()
    write_lines(tmp_path / "row" / "rle_masks", REFERENCE)
    stats = tmp_path / "row" / "stats.json"
    stats.write_text(json.dumps({"settings": {"images": ["a.jpg"] * 4}, "ms_per_request": 1.0}, indent=1))
    with pytest.raises(ValueError) as error:
        load_results(stats)
    assert str(error.value) == (f"{stats} is one JSON document spread over 11 lines, where one answer per line is "
                                f"expected: it is a study row's stats.json; give the row's folder, {tmp_path / 'row'}")
    # Lines that are no JSON, alone or together (a proxy's HTML page), are named by their line.
    (html := tmp_path / "page.html").write_text("<html>\n<body>bad gateway</body>\n</html>\n")
    with pytest.raises(ValueError, match=f"line 1 of {html} is not JSON"):
        load_results(html)
    # A per-image file is one answer, read whole: pretty-printed, it compares.
    for folder, answers in (("reference", REFERENCE), ("candidate", CANDIDATE)):
        (tmp_path / folder).mkdir()
        for index, answer_ in enumerate(answers):
            (tmp_path / folder / f"image_{index}.json").write_text(json.dumps(answer_, indent=4))
    comparisons = compare_results(tmp_path / "reference", tmp_path / "candidate")
    assert summarize(comparisons).as_dict() == pytest.approx(EXPECTED)


@pytest.mark.parametrize("line, words", [
    ('{"mask_0": {"size": [2, 2], "counts": [1, 2]}}', "mask_0: counts add up to 3, not 2 x 2 = 4"),
    ('{"mask_0": {"size": [2, 2], "counts": "PQ1"}}', "mask_0: expected counts as a list"),
    ('{"mask_0": {"size": [2, 2], "counts": [4]}, "mask_1": {"size": [1, 4], "counts": [4]}}',
     "mask_1: size [1, 4], mask_0's is [2, 2]"),
    ('{"mask_0": {"size": [2, 2], "counts": [1, 3]}', "is not JSON"),
    ('[1, 2]', "annotation 0: expected a COCO annotation with an RLE segmentation"),
    ('"mask_0"', "not a mask result"),
    ('{"mask_\u00b2": {"size": [2, 2], "counts": [4]}}', "not a mask result"),  # a digit int() does not read
    ('[{"segmentation": {"size": [2, 2], "counts": "14"}}]', "annotation 0: counts add up to 5, not 2 x 2 = 4"),
    ('[{"segmentation": {"size": [2, 2], "counts": "4"}}, {"segmentation": {"size": [2, 2], "counts": "04\\u00e9"}}]',
     "annotation 1: character 'é' at 2 is not of a COCO counts string"),
    ('[{"segmentation": {"size": [2, 2], "counts": "4P"}}]', "annotation 0: the counts string ends inside a number"),
    ('[{"segmentation": {"size": [2, 2], "counts": "4' + "o" * 100_000 + '0"}}]',
     "annotation 0: the number at 1 of the counts string is longer than any run"),
    ('[{"segmentation": {"size": [2, 2], "counts": "5O"}}]', "annotation 0: counts are runs of pixels, whole numbers "
     "from 0 up, not -1"),
    ('{"mask_0": {"size": [2, 2], "counts": [4, 1.5]}}', "mask_0: counts are runs of pixels, whole numbers from 0 up, "
     "not 1.5"),
    ('[{"segmentation": {"size": [2, 2], "counts": "4"}}, {"segmentation": {"size": [1, 4], "counts": "4"}}]',
     "annotation 1: size [1, 4], annotation 0's is [2, 2]"),
    # pycocotools counts in 32 bits: such a mask compared with itself gave mIoU 0.
    ('{"mask_0": {"size": [65536, 65536], "counts": [2147483648, 2147483648]}}',
     "mask_0: a 65536 x 65536 mask has more pixels than pycocotools counts (2**32)"),
])
def test_malformed_results_are_refused_before_pycocotools_reads_them(tmp_path, line, words):
    """pycocotools runs forever on counts that do not add up to the mask's size: such a line is
    an error naming the line and the mask, never a hang."""
    from sam2serve.compare import load_results

    path = tmp_path / "results"
    path.write_text('{"mask_0": {"size": [2, 2], "counts": [1, 3]}}\n' + line + "\n")
    with pytest.raises(ValueError, match="line 2 of") as error:
        load_results(path)
    assert words in str(error.value)


def one_rle(mask: np.ndarray) -> dict:
    return masks_to_rle_vectorized(torch.from_numpy(mask[None]))[0]


def test_compare_image_refuses_masks_of_other_sizes():
    """compare_image alone (the library's entry point, without compare_results' check first)."""
    square, wide = np.zeros((8, 8), bool), np.zeros((6, 10), bool)
    square[:4, :4] = wide[:2, :5] = True
    with pytest.raises(ValueError, match=r"^x: mask sizes differ: \[8, 8\] against \[6, 10\]$"):
        compare_image("x", [one_rle(square)], [one_rle(wide)])


def test_answers_masks_are_read_in_their_numbers_order():
    """{"mask_0", ..., "mask_10"}: in number order (mask_10 last), not the keys' text order."""
    masks = [np.zeros((4, 4), bool) for _ in range(11)]
    for index, mask in enumerate(masks):
        mask.flat[index] = True
    answer = {f"mask_{index}": one_rle(mask) for index, mask in enumerate(masks)}
    shuffled = dict(sorted(answer.items()))  # text order: mask_0, mask_1, mask_10, mask_2, ...
    assert [m["counts"] for m in masks_of(shuffled, "x")] == [answer[f"mask_{i}"]["counts"] for i in range(11)]


def test_one_answer_over_two_lines_is_named_as_one_document(tmp_path):
    """The smallest pretty-printed answer (two lines) gets the same advice as a longer one."""
    path = tmp_path / "two_lines.json"
    path.write_text('{"mask_0":\n{"size": [2, 2], "counts": [4]}}')
    with pytest.raises(ValueError, match="is one JSON document spread over 2 lines"):
        load_results(path)
