"""reproduce_experiments.py end to end on CPU: a few images, every mode, a 2x2 grid; and the
scripts' answers to a user's mistakes (one line, no traceback).

The random micro model (512-pixel input) keeps the fast modes' compilation short. Filters are
off and NMS is at 1 so that random weights still give 12 masks per image.
"""

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from unittest import mock

import pytest
from PIL import Image

import reproduce_experiments
from reproduce_experiments import RESULT_COLUMNS, Row, measured_row, result_figure, settings_changed
from sam2serve.amg import AMGConfig
from sam2serve.checkpoints import write_random_checkpoint

from .conftest import make_scene

REPO = Path(__file__).resolve().parents[1]


def run_driver(paths_file: Path, output: Path, checkpoint_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "reproduce_experiments.py"), str(paths_file), str(output),
               "--checkpoint-dir", str(checkpoint_dir), "--model-type", "micro", "--points-per-side", "2",
               "--points-per-batch", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
               "--box-nms-thresh", "1", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def micro_checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("micro")
    write_random_checkpoint(directory, "micro", seed=0)
    return directory


def test_driver_writes_the_study_table(micro_checkpoint_dir, tmp_path):
    paths = []
    for index, (height, width) in enumerate([(90, 120), (75, 61)]):
        paths.append(tmp_path / f"image_{index}.jpg")
        Image.fromarray(make_scene(height, width, seed=index)).save(paths[-1])
    (tmp_path / "paths").write_text("".join(f"{p}\n" for p in paths))
    output = tmp_path / "out"

    result = run_driver(tmp_path / "paths", output, micro_checkpoint_dir)
    assert result.returncode == 0, result.stderr
    with (output / "result.csv").open() as file:
        assert next(csv.reader(file)) == RESULT_COLUMNS
    with (output / "result.csv").open() as file:
        rows = {row["mode"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["baseline", "ao", "fast", "fast_furious"]
    for row in rows.values():
        exact = row["mode"] != "fast_furious"  # bfloat16 on CPU
        assert float(row["miou"]) == 1.0 if exact else float(row["miou"]) >= 0.9
        assert row["mask_count_mismatch"] == "0" and row["images"] == "2" and float(row["masks_per_image"]) == 12
        assert float(row["ms_per_request"]) > 0 and float(row["startup_s"]) > 0
        assert float(row["p50"]) <= float(row["p99"])
        assert float(row["max_memory_mib"]) > 100  # a process with torch and a model in it
        assert (row["batch_size"], row["points_per_batch"], row["points_per_side"], row["model_type"],
                row["device"]) == ("1", "4", "2", "micro", "cpu")
    assert (output / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each row measured as the server serves: its process set up for a CPU (memory reused,
    # denormals flushed; the study's rows ran without it, their times up to half again as long).
    assert result.stderr.count("CPU floats: denormals flushed to zero") == 4

    # Each row keeps its masks as the xargs workflow writes them; the compare tool reads them.
    rle_files = [output / "baseline_bs1_ppb4" / "rle_masks", output / "ao_bs1_ppb4" / "rle_masks"]
    for rle_file in rle_files:
        lines = rle_file.read_text().splitlines()
        assert [len(json.loads(line)) for line in lines] == [12, 12]
    for inputs in (rle_files, [file.parent for file in rle_files]):  # the files, or the rows' folders
        compared = subprocess.run([sys.executable, str(REPO / "compare_rle_lists.py"), *map(str, inputs), "--json",
                                   "--per-image-csv", str(tmp_path / "per_image.csv")],
                                  capture_output=True, text=True, timeout=120)
        assert json.loads(compared.stdout)["miou"] == 1.0, compared.stderr
    # A row's folder names each line's image too.
    assert [row["image"] for row in csv.DictReader((tmp_path / "per_image.csv").open())] == [
        f"line {index + 1} ({path.resolve()})" for index, path in enumerate(paths)]

    # A rerun with the same settings skips every row, the same checkpoint file anywhere included.
    stats = output / "ao_bs1_ppb4" / "stats.json"
    before = stats.stat().st_mtime_ns
    same_file = tmp_path / "elsewhere"
    same_file.mkdir()
    shutil.copy(micro_checkpoint_dir / "sam2.1_hiera_micro.pt", same_file)
    rerun = run_driver(tmp_path / "paths", output, same_file, "--modes", "ao")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("already done with the same settings, skipped") == 2
    assert stats.stat().st_mtime_ns == before
    # Other weights at the same path, and another image at the same path: measured again.
    write_random_checkpoint(same_file, "micro", seed=1)
    Image.fromarray(make_scene(75, 61, seed=7)).save(paths[1])
    rerun = run_driver(tmp_path / "paths", output, same_file, "--modes", "ao", "--threads", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("running again") == 2 and "checkpoint sam2.1_hiera_micro.pt#" in rerun.stderr
    assert rerun.stderr.count("the images' contents") == 2
    assert stats.stat().st_mtime_ns != before
    # --threads: each row's process runs the model on that many, and the row says so.
    assert rerun.stderr.count("CPU threads: 1 for the model's parallel operations") == 2
    assert json.loads(stats.read_text())["settings"]["threads"] == 1


def test_result_figure_names_every_row_without_overlapping_labels():
    """Rows often share a spot (mIoU 1.0 at nearly the same speed): each is still named once,
    and no two of the figure's texts cover each other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    lines = [{"mode": mode, "batch_size": 1, "points_per_batch": 64, "points_per_side": 32,
              "ms_per_request": 100.0 + index, "miou": 1.0, "model_type": "large", "device": "cuda", "images": 3}
             for index, mode in enumerate(["baseline", "ao", "fast", "fast_furious", "ao"])]
    figure = result_figure(lines)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    legend = figure.axes[0].get_legend()
    assert legend is not None, "the rows are not named in a legend"
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == [f"{line['mode']} (bs 1, ppb 64)" for line in lines]
    assert figure.axes[0].get_title() == "SAM2.1 large on cuda, 3 images, 32x32 grid"
    axes = figure.axes[0]
    texts = [*legend.get_texts(), *axes.texts, axes.title, axes.xaxis.label, axes.yaxis.label]
    boxes = [text.get_window_extent(renderer) for text in texts]
    for first in range(len(boxes)):
        for second in range(first + 1, len(boxes)):
            assert not boxes[first].overlaps(boxes[second]), (texts[first].get_text(), texts[second].get_text())


def test_a_row_without_a_strict_miou_is_drawn_at_its_relaxed_miou():
    """When every image's mask count differs from the baseline's, the strict mIoU is empty; the
    row was in the legend with no point on the axes."""
    lines = [{"mode": mode, "batch_size": 1, "points_per_batch": 64, "points_per_side": 16, "ms_per_request": ms,
              "miou": miou, "relaxed_miou": relaxed, "model_type": "micro", "device": "cpu", "images": 7}
             for mode, ms, miou, relaxed in [("baseline", 300.0, 1.0, 1.0), ("fast_furious", 100.0, None, 0.9)]]
    axes = result_figure(lines).axes[0]
    assert [points.get_offsets().tolist() for points in axes.collections] == [[[300.0, 1.0]], [[100.0, 0.9]]]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "baseline (bs 1, ppb 64)", "fast_furious (bs 1, ppb 64), relaxed mIoU"]
    assert axes.collections[1].get_facecolors().size == 0  # hollow: not a strict mIoU


def test_a_rows_progress_is_logged_where_no_terminal_shows_a_bar(caplog, monkeypatch):
    """A long row's log sent to a file said only "started", then "done" hours later."""
    from reproduce_experiments import ProgressLog

    caplog.set_level(logging.INFO, logger="experiments")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    progress = ProgressLog("ao_bs1_ppb64", 3, every_s=0.0)
    for done in (1, 2, 3):
        progress.done(done)
    assert [record.getMessage().split(",")[0] for record in caplog.records] == [
        "ao_bs1_ppb64: 1 of 3 images", "ao_bs1_ppb64: 2 of 3 images"]  # the last: the row's "done" line
    caplog.clear()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm's bar shows it
    ProgressLog("ao_bs1_ppb64", 3, every_s=0.0).done(1)
    quiet = ProgressLog("ao_bs1_ppb64", 3)  # within the first minute
    quiet.enabled = True
    quiet.done(1)
    assert caplog.records == []


def test_bad_image_list_is_refused(micro_checkpoint_dir, tmp_path):
    (tmp_path / "paths").write_text(f"{tmp_path / 'nowhere.jpg'}\n")
    result = run_driver(tmp_path / "paths", tmp_path / "out", micro_checkpoint_dir)
    assert result.returncode != 0 and "do not exist" in result.stderr
    (tmp_path / "notes.jpg").write_text("not pixels")
    (tmp_path / "paths").write_text(f"{tmp_path / 'notes.jpg'}\n")
    result = run_driver(tmp_path / "paths", tmp_path / "out", micro_checkpoint_dir)
    assert result.returncode != 0 and "1 of the 1 listed images cannot be read: " in result.stderr
    assert "notes.jpg (the file is not an image in one of the formats read: JPEG, PNG," in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any row ran
    (tmp_path / "empty").write_text("\n")
    result = run_driver(tmp_path / "empty", tmp_path / "out", micro_checkpoint_dir)
    assert result.returncode != 0 and "lists no images" in result.stderr
    result = run_driver(REPO / "examples" / "shapes.jpg", tmp_path / "out", micro_checkpoint_dir)  # not a list
    assert result.returncode != 0 and "shapes.jpg is not a text file of image paths" in result.stderr
    result = run_driver(tmp_path / "paths", tmp_path / "notes.jpg", micro_checkpoint_dir)  # a file as output
    assert result.returncode != 0 and "notes.jpg is a file, not a folder" in result.stderr


def test_damaged_checkpoint_ends_the_study_with_what_to_do(tmp_path):
    Image.fromarray(make_scene(40, 40, seed=0)).save(tmp_path / "image.jpg")
    (tmp_path / "paths").write_text(f"{tmp_path / 'image.jpg'}\n")
    (tmp_path / "sam2").mkdir()
    (tmp_path / "sam2" / "sam2.1_hiera_micro.pt").write_bytes(b"PK\x03\x04 half a download")
    result = run_driver(tmp_path / "paths", tmp_path / "out", tmp_path / "sam2")
    assert result.returncode != 0
    assert "sam2.1_hiera_micro.pt is not a torch checkpoint, or it is damaged" in result.stderr
    assert not (tmp_path / "out").exists()  # no empty row folder, nor the empty output folder it made


@pytest.mark.parametrize("killed_while_importing", [False, True])
def test_a_rows_process_ends_with_the_study_process(tmp_path, killed_while_importing):
    """A row's process whose study process is killed (or stopped by a signal sent to it alone)
    ends instead of finishing the row unseen, holding its memory; also where the study was
    killed while the row's process still started (imports of seconds, torch's), before it
    began to watch."""
    (tmp_path / "study.py").write_text(textwrap.dedent("""
        import multiprocessing, os, sys, time
        sys.path.insert(0, sys.argv[1])

        def row(study_pid, importing_s):
            time.sleep(importing_s)
            from reproduce_experiments import exit_with_parent
            exit_with_parent(study_pid)
            print("watching", flush=True)
            time.sleep(120)

        if __name__ == "__main__":
            child = multiprocessing.get_context("spawn").Process(target=row, args=(os.getpid(), float(sys.argv[2])))
            child.start()
            print(child.pid, flush=True)
            time.sleep(120)
    """))
    importing_s = "3" if killed_while_importing else "0"
    study = subprocess.Popen([sys.executable, str(tmp_path / "study.py"), str(REPO), importing_s],
                             stdout=subprocess.PIPE, text=True)
    try:
        row = int(study.stdout.readline())
        if not killed_while_importing:
            assert study.stdout.readline() == "watching\n"
    finally:
        study.kill()
        study.wait()
    deadline = time.monotonic() + 20
    while True:
        try:
            if Path(f"/proc/{row}/stat").read_text().split()[2] == "Z":  # ended, not yet reaped
                break
        except FileNotFoundError:  # ended and reaped
            break
        assert time.monotonic() < deadline, "the row's process outlived the study's"
        time.sleep(0.2)


def study_with_a_row_under_way(tmp_path: Path, *options: str, **popen) -> tuple[subprocess.Popen, int]:
    """The study on 50 images (a 32x32 grid: a row of minutes), started; returned with its row's
    process once that row's images are under way."""
    paths = tmp_path / "paths"
    paths.write_text(f"{REPO / 'examples' / 'shapes.jpg'}\n" * 50)
    study = subprocess.Popen(
        [sys.executable, str(REPO / "reproduce_experiments.py"), str(paths), str(tmp_path / "out"),
         "--checkpoint-dir", str(REPO / "models"), "--model-type", "micro", *options],
        stderr=subprocess.PIPE, text=True, **popen)
    try:
        row = wait_for_child(study.pid)
        deadline = time.monotonic() + 120
        while not list((tmp_path / "out").rglob("rle_masks.partial")):
            assert time.monotonic() < deadline and study.poll() is None
            time.sleep(0.2)
    except BaseException:
        study.kill()
        raise
    return study, row


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_study_stopped_alone_ends_its_rows_process_at_once(signum, tmp_path):
    """SIGINT or SIGTERM sent to the study's process alone (not its group, as Ctrl-C does):
    it says how to resume, and its row's process is ended with it, not waited for."""
    study, row = study_with_a_row_under_way(  # SIGINT not ignored, as under a shell's &
        tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        study.send_signal(signum)
        _, stderr = study.communicate(timeout=60)  # the process pool this replaced waited for the row
    finally:
        study.kill()
    how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"  # as run_script's scripts
    assert study.returncode == -signum, stderr[-2000:]  # ended by the signal: a shell sees 130 or 143
    assert f"stopped ({how}); the same command again resumes it" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not Path(f"/proc/{row}").exists()  # ended and reaped by the study's process
    assert not list((tmp_path / "out").rglob("*.partial"))  # the stopped row's masks so far are not left


def test_a_rows_process_killed_ends_the_study_with_one_line(tmp_path):
    """A row's process killed (the kernel's out-of-memory killer sends SIGKILL) ended the study in
    a traceback: one line now, which names the row and the signal."""
    study, row = study_with_a_row_under_way(tmp_path, "--threads", "1")
    try:
        os.kill(row, signal.SIGKILL)
        _, stderr = study.communicate(timeout=60)
    finally:
        study.kill()
    assert study.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert ("\nerror: baseline_bs1_ppb64: the row's process ended without an answer (exit code -9: SIGKILL, "
            "which the system also sends where memory runs out); the rows done are kept\n") in stderr, stderr[-2000:]


class TwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def raise_value_error():
    raise ValueError("a row's own error")


def raise_two_arguments():
    raise TwoArguments("this", "that")


def end_without_answer():
    os._exit(3)


def test_a_rows_process_starts_with_ctrl_c_ignored(monkeypatch):
    """The study's process handles Ctrl-C; a row's process that got it while importing torch,
    before it set its own signal handling, printed its KeyboardInterrupt traceback."""
    spawn = reproduce_experiments.get_context("spawn")
    ignored, handler_before = [], signal.getsignal(signal.SIGINT)  # ignored too where the tests run under `&`

    class Receiver:  # reads the row's process's ignored signals once it runs Python, before its answer
        def __init__(self, connection):
            self.connection = connection

        def recv(self):
            status = Path(f"/proc/{wait_for_child(os.getpid())}/status").read_text()
            mask = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
            ignored.append(bool(mask >> (signal.SIGINT - 1) & 1))
            return self.connection.recv()

    def pipe(duplex):
        receiver, sender = spawn.Pipe(duplex=duplex)
        return Receiver(receiver), sender

    monkeypatch.setattr(reproduce_experiments, "get_context",
                        lambda method: types.SimpleNamespace(Pipe=pipe, Process=spawn.Process))
    assert reproduce_experiments.in_fresh_process(os.getpid) != os.getpid()
    assert ignored == [True]
    assert signal.getsignal(signal.SIGINT) is handler_before  # this process's, as it was


def test_a_rows_error_reaches_the_study_as_it_was_raised():
    """The row's error is raised again in the study's process: as itself where it can be rebuilt,
    else by its name and message; a process that ends without answering says its exit code."""
    from reproduce_experiments import in_fresh_process

    with pytest.raises(ValueError, match="a row's own error"):
        in_fresh_process(raise_value_error)
    with pytest.raises(RuntimeError, match="TwoArguments: this and that"):
        in_fresh_process(raise_two_arguments)
    with pytest.raises(RuntimeError, match="ended without an answer \\(exit code 3\\)"):
        in_fresh_process(end_without_answer)
    # Killed by a signal: named, a real-time one (which has no name) by its number.
    from reproduce_experiments import RowEnded

    assert str(RowEnded(-signal.SIGTERM)) == "the row's process ended without an answer (exit code -15: SIGTERM)"
    assert str(RowEnded(-35)) == "the row's process ended without an answer (exit code -35: signal 35)"


def cpu_peak_mib() -> float:
    from sam2serve.timing import peak_memory_mib

    return peak_memory_mib("cpu")[0]


def test_a_rows_cpu_peak_memory_is_its_own_process_s():
    """On a CPU, a row's max_memory_mib is the peak resident memory of the row's own process,
    not the study's: a spawned process's getrusage peak carries the study process's over (with
    1.5 GiB held here, a micro row read 2.2 GiB)."""
    import numpy as np

    from reproduce_experiments import in_fresh_process

    ballast = np.ones(1500 * 2**20 // 8)  # 1.5 GiB, resident: written
    study = cpu_peak_mib()
    row = in_fresh_process(cpu_peak_mib)
    del ballast
    assert study > 1500 and row < study - 1000, (study, row)


def peak_and_resident_bytes_holding_half_a_gib() -> tuple[int, int]:
    import numpy as np

    from sam2serve.timing import peak_resident_bytes

    ballast = np.ones(2**29 // 8)  # written: resident
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = peak_resident_bytes()
    del ballast
    return peak, resident


def test_a_processs_peak_memory_is_read_in_bytes():
    """VmHWM is in KiB: a process holding 0.5 GiB on top of its start, its peak is at least what it
    holds now (/proc/self/statm, in pages; KiB read as 1000 bytes gave 2.3 % less), and not half
    as much again (short of memory, the kernel may drop some of its pages meanwhile)."""
    from reproduce_experiments import in_fresh_process

    peak, resident = in_fresh_process(peak_and_resident_bytes_holding_half_a_gib)
    assert resident <= peak < 1.5 * resident, (peak, resident)


def wait_for_child(pid: int, timeout_s: float = 60) -> int:
    """The pid of the process that pid spawned to run a function (not multiprocessing's
    resource tracker); Linux: read from /proc."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                    return int(stat.parent.name)
            except (OSError, ValueError, IndexError):  # ended meanwhile
                continue
        time.sleep(0.2)
    raise AssertionError(f"no child of {pid} within {timeout_s} s")


def test_a_rerun_names_the_settings_that_changed():
    before = {"model_type": "micro", "amg": {"points_per_side": 8, "box_nms_thresh": 0.7}, "images": ["a"]}
    now = {"model_type": "micro", "amg": {"points_per_side": 4, "box_nms_thresh": 0.7}, "images": ["a", "b"]}
    assert settings_changed(before, now) == ["the image list", "points_per_side 8 -> 4"]
    assert settings_changed(before, before) == []
    assert settings_changed({**before, "image_contents": "1f"}, {**before, "image_contents": "2e"}) == [
        "the images' contents"]


@pytest.mark.parametrize("damaged", ['{"sett', '[1, 2]', '{"settings": 3}'])
def test_a_row_whose_stats_cannot_be_read_runs_again(damaged, monkeypatch, tmp_path, caplog):
    """A damaged stats.json (a disk full, an edit) ended the study with a traceback."""
    row_dir = tmp_path / "ao_bs1_ppb64"
    row_dir.mkdir()
    (row_dir / "rle_masks").write_text("{}\n")
    (row_dir / "stats.json").write_text(damaged)
    settings = {"amg": {"points_per_side": 4}}
    monkeypatch.setattr(reproduce_experiments, "in_fresh_process", lambda *arguments: {"settings": settings})
    with caplog.at_level(logging.INFO):
        assert measured_row(Row("ao"), settings, tmp_path / "checkpoint.pt", row_dir, "row") == {"settings": settings}
    assert "stats.json cannot be read; running again" in caplog.text
    assert json.loads((row_dir / "stats.json").read_text()) == {"settings": settings}


def test_a_row_stopped_while_replacing_masks_keeps_the_earlier_row_whole(monkeypatch, tmp_path):
    """The row's process replaces rle_masks before the study writes stats.json: stopped in
    between, the folder held the earlier run's settings beside the new masks (and stopped before
    the new masks, the earlier masks without their settings). It holds the earlier row again."""
    row_dir = tmp_path / "ao_bs1_ppb64"
    row_dir.mkdir()
    (row_dir / "rle_masks").write_text("{}\n")
    old, new = {"amg": {"points_per_side": 8}}, {"amg": {"points_per_side": 4}}
    (row_dir / "stats.json").write_text(json.dumps({"settings": old}))
    runs = []

    def stopped_after_the_masks(function, row, settings, checkpoint, folder, label):
        runs.append(settings)
        (folder / "rle_masks").write_text('{"mask_0": "new"}\n')
        raise KeyboardInterrupt

    def stopped_at_once(*arguments):
        runs.append("stopped")
        raise KeyboardInterrupt

    for stop in (stopped_after_the_masks, stopped_at_once):
        monkeypatch.setattr(reproduce_experiments, "in_fresh_process", stop)
        with pytest.raises(KeyboardInterrupt):
            measured_row(Row("ao"), new, tmp_path / "checkpoint.pt", row_dir, "row")
        assert sorted(path.name for path in row_dir.iterdir()) == ["rle_masks", "stats.json"]
        assert (row_dir / "rle_masks").read_text() == "{}\n"
        assert json.loads((row_dir / "stats.json").read_text()) == {"settings": old}
    assert runs == [new, "stopped"]
    # Finished, the new row replaces the earlier one.
    def finished(function, row, settings, checkpoint, folder, label):
        (folder / "rle_masks").write_text('{"mask_0": "new"}\n')
        return {"settings": settings}

    monkeypatch.setattr(reproduce_experiments, "in_fresh_process", finished)
    assert measured_row(Row("ao"), new, tmp_path / "checkpoint.pt", row_dir, "row") == {"settings": new}
    assert sorted(path.name for path in row_dir.iterdir()) == ["rle_masks", "stats.json"]
    assert (row_dir / "rle_masks").read_text() == '{"mask_0": "new"}\n'
    assert json.loads((row_dir / "stats.json").read_text()) == {"settings": new}


@pytest.mark.parametrize("finished", [False, True])
def test_a_row_whose_study_was_killed_is_the_earlier_row_again_or_the_finished_one(monkeypatch, tmp_path, finished):
    """Killed (SIGKILL) while a row ran again, the study left the earlier run's files set aside and
    maybe the row's masks without settings: the next run put those masks aside as the earlier
    ones (the earlier masks lost), or ran a row done already."""
    row_dir = tmp_path / "ao_bs1_ppb64"
    row_dir.mkdir()
    old, new = {"amg": {"points_per_side": 8}}, {"amg": {"points_per_side": 4}}
    (row_dir / "rle_masks.earlier").write_text("{}\n")
    (row_dir / "stats.json.earlier").write_text(json.dumps({"settings": old}))
    (row_dir / "rle_masks").write_text('{"mask_0": "new"}\n')  # the row's process had written its masks
    if finished:  # killed as the files set aside were deleted
        (row_dir / "stats.json").write_text(json.dumps({"settings": new}))
    monkeypatch.setattr(reproduce_experiments, "in_fresh_process", lambda *arguments: pytest.fail("ran again"))
    done = new if finished else old
    assert measured_row(Row("ao"), done, tmp_path / "checkpoint.pt", row_dir, "row") == {"settings": done}
    assert sorted(path.name for path in row_dir.iterdir()) == ["rle_masks", "stats.json"]
    assert (row_dir / "rle_masks").read_text() == ('{"mask_0": "new"}\n' if finished else "{}\n")


@pytest.mark.parametrize("script, arguments, message", [
    ("tools.benchmark", ["--generated", "0"], "--generated: must be 1 or more, got 0"),
    # sam2 built without its CUDA extension (as here) skips it: ao would look wrong against it.
    ("reproduce_experiments", ["{tmp}/paths", "{tmp}/out", "--min-mask-region-area", "50"],
     "would not apply --min-mask-region-area: sam2 skips min_mask_region_area without its CUDA extension"),
    ("tools.benchmark", ["--generated", "1", "--min-mask-region-area", "50"], "compare with ao (--reference ao)"),
    ("reproduce_experiments", ["{tmp}/paths", "{tmp}/out", "--device", "gpu"], "--device gpu: not a torch device"),
    ("reproduce_experiments", ["{tmp}", "{tmp}/out"], "is a folder; give a text file of image paths"),
    # torch's meta tensors hold no numbers: a server on them said "ready" and answered 500s.
    ("reproduce_experiments", ["{tmp}/paths", "{tmp}/out", "--device", "meta"], "--device meta: not a device the"),
    ("reproduce_experiments", ["{tmp}/paths", "{tmp}/out", "--device", "cpu:5"], "--device cpu:5: not a device the"),
    # Root may write anywhere os.access is asked, /proc included, where no file can be made.
    ("reproduce_experiments", ["{tmp}/paths", "/proc/out"],
     "/proc is not writable (a file made there failed: No such file or directory)"),
    ("tools.benchmark", ["--save-masks", "/proc/masks"], "/proc is not writable"),
    ("compare_rle_lists", ["{tmp}/notes.jpg", "{tmp}/b", "--per-image-csv", "/proc/x.csv"],
     "/proc is not writable"),
    ("compare_rle_lists", ["{tmp}/notes.jpg", "{tmp}/b", "--per-image-csv", "{tmp}/notes.jpg"],
     "notes.jpg: that is an input file; the output would replace it"),
    # A checkpoint of another size is every row's mistake: one line, not a row's traceback.
    ("tools.benchmark", ["{tmp}/micro_as_tiny", "tiny", "--generated", "1", "--modes", "ao", "--without-baseline"],
     "does not fit SAM2.1 tiny"),
    ("deploy.ray_bulk_job", ["{tmp}/notes.jpg", "{tmp}/out", "--load-fast", "{tmp}"],
     "--load-fast and --compile-mode go with a fast"),
    ("deploy.ray_bulk_job", ["{tmp}/notes.jpg", "{tmp}/out", "--checkpoint-dir", "{tmp}", "--model-type", "micro"],
     "is not a torch checkpoint, or it is damaged"),
    ("tools.benchmark", ["--images", "{tmp}/notes.jpg"], "notes.jpg: the file is not an image in one of the"),
    ("tools.benchmark", ["--save-masks", "{tmp}/notes.jpg/masks"], "notes.jpg is a file, not a folder"),
    ("tools.benchmark", ["{tmp}", "micro", "--generated", "1"], "is not a torch checkpoint, or it is damaged"),
    ("tools.benchmark_prompts", ["--images", "{tmp}/absent.jpg"], "absent.jpg: No such file or directory"),
    # A file that is not there, in a user's words ("[Errno 2] No such file or directory: '...'" before).
    ("reproduce_experiments", ["{tmp}/absent", "{tmp}/out"], "error: {tmp}/absent: No such file or directory"),
    ("deploy.ray_bulk_job", ["{tmp}/absent", "{tmp}/out"], "error: {tmp}/absent: No such file or directory"),
    ("deploy.modal_app", ["replay", "{tmp}/absent", "{tmp}/out"], "error: {tmp}/absent: No such file or directory"),
    ("compare_rle_lists", ["{tmp}/absent", "{tmp}/notes.jpg"], "error: {tmp}/absent: No such file or directory"),
    ("training.train_micro_sam2", ["--save-every", "0"], "--save-every: must be 1 or more, got 0"),
    ("training.train_micro_sam2", ["--seed", "1" + "0" * 20], "--seed: must be 0 to 9223372036854775807"),
    ("sam2serve.checkpoints", ["{tmp}/random", "micro", "--seed", "-1"], "--seed: must be 0 to 9223372036854775807"),
    ("training.train_micro_sam2", ["--points-per-image", "1"], "must be 2 or more (half points, half boxes)"),
    # NaN weights were written over --output (the committed model by default), and the run said it trained.
    ("training.train_micro_sam2", ["--lr", "1", "--steps", "4", "--images-per-step", "1", "--points-per-image", "2",
                                   "--output", "{tmp}/out.pt"], "error: the training diverged: loss "),
    # The last step's update, made after its loss was checked: its loss is checked after the loop.
    ("training.train_micro_sam2", ["--lr", "1", "--steps", "1", "--images-per-step", "1", "--points-per-image", "2",
                                   "--output", "{tmp}/out.pt"], "on the first step's batch after the last"),
    ("training.train_micro_sam2", ["--lr", "1e30"], "--lr: must be above 0 and at most 1, got 1e30"),
    ("training.train_micro_sam2", ["--output", "{tmp}/notes.jpg/out.pt"], "notes.jpg is a file, not a folder"),
    ("training.train_micro_sam2", ["--photo-share", "0.5", "--photo-from", "9", "--steps", "9"],
     "--photo-from 9: at or after --steps 9"),
    ("training.train_micro_sam2", ["--init", "{tmp}/sam2.1_hiera_micro.pt", "--output", "{tmp}/out.pt"],
     "is not a torch checkpoint, or it is damaged"),
    ("training.real_photos", ["--save-overlays", "{tmp}/notes.jpg"], "notes.jpg is a file, not a folder"),
    ("tools.load_test", ["127.0.0.1:5000", "{tmp}/notes.jpg"], "give the server as http://HOST:PORT"),
    ("tools.load_test", ["{tmp}/notes.jpg", "http://127.0.0.1:5000"], "give the server as http://HOST:PORT"),
    ("tools.load_test", ["http://127.0.0.1:5000", "{tmp}/absent.jpg"], "error: {tmp}/absent.jpg: No such file"),
    ("tools.load_test", ["http://127.0.0.1:5000", "{tmp}/notes.jpg", "--time-limit", "inf"],
     "--time-limit: must be above 0 and at most"),
    ("tools.load_test", ["http://127.0.0.1:5000", "{tmp}/notes.jpg", "--time-limit", "1e300"],  # past time_t
     "--time-limit: must be above 0 and at most"),
    ("tools.benchmark", ["--size", "100000", "100000"], "--size: must be 1 to 16384, got 100000"),
    # More threads than cores start as many, to no use.
    ("tools.benchmark", ["--threads", "100000"], "--threads 100000: this process may use"),
    ("tools.benchmark_prompts", ["--threads", "100000"], "--threads 100000: this process may use"),
    ("reproduce_experiments", ["{tmp}/paths", "{tmp}/out", "--threads", "100000"], "--threads 100000: this process may use"),
    ("tools.benchmark", ["--modes", "ao", "fast", "ao"], "--modes: ao given more than once"),
    ("tools.benchmark", ["--filters", "off", "sam2", "off"], "--filters: off given more than once"),
    ("tools.benchmark", ["--modes", "ao", "--save-fast", "{tmp}/kernels"], "--save-fast and --load-fast go with a fast"),
    ("tools.benchmark", ["--modes", "ao", "--load-fast", "{tmp}"], "--save-fast and --load-fast go with a fast"),
    ("tools.benchmark", ["--modes", "fast", "--cpu-target", "x86-64-v3"], "--cpu-target goes with --save-fast"),
    ("tools.benchmark", ["--modes", "ao", "--reference", "ao", "--ablation"],
     "--ablation times sam2's decoder from the baseline's model: it needs the baseline"),
    # The study's row alone on a CPU, where it cannot run: said before any scene is drawn.
    ("tools.benchmark", ["--modes", "study_ao", "--without-reference", "--device", "cpu"],
     "no row to run: torchao._models.sam2 (torchao 0.18) runs on CUDA only"),
    # Before a thousand scenes are drawn (3 minutes), not after.
    ("tools.benchmark", ["{tmp}/absent", "--generated", "1000"], "give both a checkpoint folder and a model type"),
    # An empty path (an unset variable, say) is not the current folder, nor nothing to write.
    ("tools.benchmark", ["--save-masks", ""], "--save-masks: empty; give a folder"),
    ("tools.benchmark", ["--modes", "fast", "--load-fast", ""], "--save-fast and --load-fast take a folder"),
    ("tools.benchmark", ["", "micro"], "the checkpoint folder is empty"),
    ("reproduce_experiments", ["{tmp}/paths", ""], "output_folder: empty; give a folder"),
    ("reproduce_experiments", ["", "{tmp}/out"], "no paths file given (an empty name)"),
    ("reproduce_experiments", ["{tmp}/paths", "{tmp}/out", "--checkpoint-dir", "", "--model-type", "micro"],
     "the checkpoint folder is empty"),
    ("compare_rle_lists", ["{tmp}/notes.jpg", "{tmp}/b", "--per-image-csv", ""], "--per-image-csv: empty"),
    ("training.real_photos", ["--save-overlays", ""], "--save-overlays: empty; give a folder"),
    ("tools.benchmark", ["--load-fast", "{tmp}/exported"], "exported: no such folder"),
    ("deploy.ray_bulk_job", ["{tmp}/notes.jpg", "{tmp}"], "a folder; give the file to write the lines to"),
    ("deploy.ray_bulk_job", ["{tmp}/notes.jpg", "{tmp}/./notes.jpg"], "that is an input file"),
    ("deploy.modal_app", ["replay", "{tmp}/notes.jpg", "{tmp}/notes.jpg"], "that is an input file"),
    # One of the listed images as the output: its lines would have replaced that image.
    ("deploy.ray_bulk_job", ["{tmp}/images", "{tmp}/shapes.jpg"], "that is an input file"),
    ("deploy.modal_app", ["replay", "{tmp}/images", "{tmp}/shapes.jpg"], "that is an input file"),
    # Found before Ray starts, not by each worker.
    ("deploy.ray_bulk_job", ["{tmp}/images", "{tmp}/out", "--mode", "fast", "--load-fast", "{tmp}/absent"],
     "--load-fast '{tmp}/absent': no such folder"),
    ("deploy.ray_bulk_job", ["{tmp}/images", "{tmp}/out", "--mode", "fast", "--load-fast", ""],
     "--load-fast '': no such folder"),
    ("deploy.ray_bulk_job", ["{tmp}/images", "{tmp}/out", "--mode", "fast", "--load-fast", "{tmp}", "--compile-mode",
                             "default"], "give --compile-mode or --load-fast, not both"),
    ("tools.benchmark", ["--modes", "fast", "--load-fast", "{tmp}", "--compile-mode", "default"],
     "give --compile-mode or --save-fast/--load-fast, not both"),
    ("deploy.modal_app", ["replay", "{tmp}/notes.jpg", "{tmp}/out.pt"],
     "1 of the 1 listed images do not exist as files"),
    # An empty name (an unset variable): told so, not that "." is a folder.
    ("deploy.ray_bulk_job", ["", "{tmp}/out"], "no paths file given (an empty name)"),
    ("deploy.ray_bulk_job", ["{tmp}/images", ""], "output: empty; give a file"),
    ("deploy.modal_app", ["replay", "{tmp}/images", ""], "output: empty; give a file"),
    ("training.train_micro_sam2", ["--output", ""], "--output: empty; give a file"),
    ("tools.load_test", ["http://127.0.0.1:5000", ""], "error: an image file's name is empty"),
    # A file where a row's folder goes (or a folder where result.csv goes): a traceback before.
    ("reproduce_experiments", ["{tmp}/images", "{tmp}/rows", "--checkpoint-dir", "{tmp}/micro_as_tiny", "--model-type",
                               "tiny", "--modes", "ao"], "error: {tmp}/rows/baseline_bs1_ppb64: File exists"),
])
def test_scripts_refuse_mistakes_in_one_line(script, arguments, message, tmp_path):
    """A count of 0, a file that is not an image, a file where a folder goes, a damaged
    checkpoint: the script says so in one line before any long work, never with a traceback."""
    (tmp_path / "notes.jpg").write_text("not pixels")
    (tmp_path / "sam2.1_hiera_micro.pt").write_bytes(b"PK\x03\x04 half a download")
    (tmp_path / "micro_as_tiny").mkdir()
    (tmp_path / "micro_as_tiny" / "sam2.1_hiera_tiny.pt").symlink_to(REPO / "models" / "sam2.1_hiera_micro.pt")
    shutil.copy(REPO / "examples" / "shapes.jpg", tmp_path / "shapes.jpg")
    (tmp_path / "images").write_text(f"{tmp_path}/shapes.jpg\n")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "baseline_bs1_ppb64").write_text("")
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    message = message.format(tmp=tmp_path)
    result = subprocess.run([sys.executable, "-m", script, *arguments], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_devices_the_models_run_on():
    """The CPU (cpu:0 is torch's name for it too) and CUDA GPUs; not torch's meta device, whose
    tensors hold no numbers; and on a machine without CUDA, no CUDA device."""
    import torch

    from sam2serve.cli import device_problem

    assert device_problem("cpu") is None and device_problem("cpu:0") is None
    assert "not a device the models run on" in device_problem("cpu:1")
    assert "not a device the models run on" in device_problem("meta")
    assert "not a torch device" in device_problem("gpu")
    assert device_problem("cuda:3", here=False) is None  # a cluster's machines, not this one
    if not torch.cuda.is_available():
        assert "CUDA is not available" in device_problem("cuda")


def test_number_options_refuse_values_out_of_range():
    """Learning rates above 0, seeds and steps from 0, shares from 0 to 1, in argparse's words."""
    from argparse import ArgumentTypeError

    from sam2serve.cli import non_negative_int
    from training.train_micro_sam2 import learning_rate, share

    for check, good, bad in [(learning_rate, ["1e-3", "1"], ["0", "-1", "2", "inf", "nan", "x"]),
                             (non_negative_int, ["0", "7"], ["-1", "1.5"]),
                             (share, ["0", "0.6", "1"], ["-0.1", "1.5", "nan"])]:
        assert [check(text) for text in good] == [float(text) for text in good]
        for text in bad:
            with pytest.raises(ArgumentTypeError):
                check(text)


def test_the_scripts_log_leaves_out_sam2s_per_image_lines():
    """sam2's predictor logs three INFO lines per image on the root logger; the scripts' log
    (set_up_logging's filter) drops them and keeps everything else."""
    import io
    import logging

    from sam2serve.amg import image_predictor
    from sam2serve.checkpoints import DEFAULT_CHECKPOINT_DIR, load_model
    from sam2serve.cli import Sam2ImageChatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(Sam2ImageChatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        model = load_model(DEFAULT_CHECKPOINT_DIR / "sam2.1_hiera_micro.pt", "micro", "cpu").model
        image_predictor(model).set_image(make_scene(64, 64, seed=0))
        logging.getLogger("server").info("ours")
        logging.warning("a warning on the root logger")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert stream.getvalue().splitlines() == ["ours", "a warning on the root logger"]


BY_PATH = ["tools/aoti_check.py", "tools/benchmark.py", "tools/benchmark_prompts.py", "tools/decoder_profile.py",
           "tools/load_test.py", "training/real_photos.py", "training/train_micro_sam2.py", "deploy/ray_bulk_job.py",
           "deploy/modal_app.py"]


def test_the_scripts_in_folders_run_by_their_path_too(tmp_path):
    """`python tools/benchmark.py` ended in ModuleNotFoundError (sam2serve; for the training
    scripts, sam2's own package named `training` was found first): they run as with -m."""
    assert sorted(BY_PATH) == sorted(
        str(path.relative_to(REPO)) for folder in ("tools", "training", "deploy") for path in (REPO / folder).glob("*.py")
        if '__name__ == "__main__"' in path.read_text())
    runs = [subprocess.Popen([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in BY_PATH]
    for script, run in zip(BY_PATH, runs):
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and out.startswith(f"usage: {Path(script).name}"), (script, err[-500:])


def test_a_cuda_device_this_machine_lacks_is_refused_by_its_number():
    """On a machine with two GPUs, cuda:0 and cuda:1 (and cuda) are taken, cuda:2 is not."""
    import torch

    from sam2serve.cli import device_problem

    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "device_count", return_value=2):
        assert device_problem("cuda") is None and device_problem("cuda:0") is None
        assert device_problem("cuda:1") is None
        assert device_problem("cuda:2") == "this machine has 2 CUDA device(s), cuda:0 to cuda:1"


def test_latency_columns_are_the_mean_and_percentiles_of_the_requests_in_ms():
    """result.csv's ms_per_request, p50, p90 and p99 (and the benchmark's columns): the mean and
    the 50th, 90th and 99th percentiles, in milliseconds, of requests timed in seconds; one slow
    request among quick ones sets each of them apart."""
    from sam2serve.timing import latency_summary_ms

    summary = latency_summary_ms([0.01] * 8 + [0.02, 1.0])
    assert summary == pytest.approx({"ms_per_request": 110.0, "p50": 10.0, "p90": 118.0, "p99": 911.8})


def test_a_rows_peak_memory_share_is_a_percentage_of_the_machines_memory():
    """max_memory_pct: the peak (max_memory_mib) in percent of the machine's memory, not a fraction."""
    from sam2serve.timing import peak_memory_mib

    mib, percent = peak_memory_mib("cpu")
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert mib > 100 and percent == pytest.approx(100 * mib / total_mib)


def test_seeds_are_signed_64_bit_numbers():
    """torch.manual_seed's range as a signed 64-bit number: 2**63 - 1 is the largest taken."""
    from argparse import ArgumentTypeError

    from sam2serve.cli import seed

    assert seed("0") == 0 and seed(str(2**63 - 1)) == 2**63 - 1
    for text in (str(2**63), "-1"):
        with pytest.raises(ArgumentTypeError, match="must be 0 to 9223372036854775807"):
            seed(text)


def test_a_paths_file_is_split_at_newlines_alone(tmp_path):
    """One path per line, as the README's curl command sends each line: a name's own spaces,
    form feed or Unicode line separator are kept (str.splitlines would split or strip them and
    the answers would not line up with the list); blank lines and a Windows line ending go."""
    from sam2serve.cli import read_image_paths

    names = ["a\x0cb.jpg", "c\u2028d.png", "end space.jpg ", " lead.png", "e\x85f.png", "g\rh.png"]
    listed = tmp_path / "paths"
    listed.write_bytes(("\n".join(names[:3]) + "\n\n  \n" + "\r\n".join(names[3:]) + "\r\n").encode())
    assert read_image_paths(listed) == names
    # Saved as "UTF-8 with BOM", its first path was said not to exist, as its own folder's.
    listed.write_bytes("\ufeff/data/a.jpg\n".encode())
    with pytest.raises(ValueError, match="starts with a byte-order mark"):
        read_image_paths(listed)
    listed.write_bytes("/data/caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 at byte 9"):
        read_image_paths(listed)


def catches_sigterm(pid: int) -> bool:
    """Whether a process has a handler of its own for SIGTERM (Linux's SigCgt mask): Python
    catches SIGINT from its start, SIGTERM only once a script asks."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("script, signum", [
    ("reproduce_experiments", signal.SIGINT), ("reproduce_experiments", signal.SIGTERM),
    ("tools.benchmark", signal.SIGINT), ("tools.load_test", signal.SIGINT), ("compare_rle_lists", signal.SIGINT),
    ("training.train_micro_sam2", signal.SIGTERM), ("deploy.ray_bulk_job", signal.SIGINT),
    ("sam2serve.checkpoints", signal.SIGINT), ("deploy.modal_app", signal.SIGTERM),
])
def test_a_stop_while_a_script_imports_torch_is_one_line(script, signum):
    """Ctrl-C in a script's first seconds, while it imports torch, printed a traceback from inside
    torch (and a SIGTERM ended it without a word): one line, with a shell's status for the signal."""
    def as_from_a_terminal():  # whatever the test run inherited
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", script, "--help"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while not catches_sigterm(process.pid) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signum)  # its imports after the first lines still to come: torch's take seconds
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    stop = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert process.returncode == -signum and stderr == f"stopped ({stop}) while starting\n", stderr


def test_a_rows_columns_say_what_it_ran_and_how_its_threads_waited(trained_micro_checkpoint, monkeypatch, tmp_path,
                                                                     caplog):
    """points_per_batch: the baseline cuts its points per batch on large images
    (amg.REFERENCE_BATCH_BYTES); the study's column said the configured batch where the row had
    run with fewer. core_wait_pct: a row measured while other work took its cores said nothing
    of it (ao and fast, the same eager code, measured 1.7x apart). Each request's seconds are kept."""
    from sam2serve import amg

    monkeypatch.setattr(reproduce_experiments, "set_up_cpu_process", lambda *args: None)  # this process's own
    monkeypatch.setattr(reproduce_experiments, "set_up_logging", lambda: None)
    waits = iter([1e4, 0.0])  # each row's: the baseline's threads waited, ao's did not
    monkeypatch.setattr(reproduce_experiments, "core_wait_seconds_since", lambda before: next(waits))
    caplog.set_level(logging.WARNING, logger="experiments")
    monkeypatch.setattr(amg, "REFERENCE_BATCH_BYTES", 10 * amg.REFERENCE_BYTES_PER_POINT_PIXEL * 120 * 160)
    paths = []
    for index, (height, width) in enumerate([(60, 80), (120, 160)]):  # the second: 10 points a batch
        paths.append(tmp_path / f"image_{index}.png")
        Image.fromarray(make_scene(height, width, seed=index)).save(paths[-1])
    settings = {"device": "cpu", "threads": None, "images": [str(path) for path in paths], "model_type": "micro",
                "torch_version": "any", "amg": {"points_per_side": 4, "points_per_batch": 64}}
    counts, waited = {}, {}
    for mode in ("baseline", "ao"):
        (tmp_path / mode).mkdir()
        stats = reproduce_experiments.run_row(Row(mode), settings, trained_micro_checkpoint, tmp_path / mode, mode)
        counts[mode], waited[mode] = stats["points_per_batch"], stats["core_wait_pct"]
        line = reproduce_experiments.result_line(Row(mode), AMGConfig(**settings["amg"]), stats,
                                                 tmp_path / "baseline", tmp_path / mode)
        assert line["points_per_batch"] == counts[mode] and line["miou"] == 1.0
        assert line["core_wait_pct"] == waited[mode]
        assert len(stats["request_seconds"]) == 2
        assert stats["ms_per_request"] == pytest.approx(1000 * sum(stats["request_seconds"]) / 2)
    assert counts == {"baseline": 10, "ao": 64}
    assert waited["baseline"] > 10 and waited["ao"] == 0
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["baseline"]
    assert "waited for a core" in caplog.records[0].getMessage()


def test_a_threads_wait_for_a_core_is_measured():
    """core_wait_seconds_since: this thread and a busy process on one core wait for it in turn;
    a thread that ends meanwhile takes nothing off (a sum over the threads alive did: its whole
    wait went out of the difference, and hid the others')."""
    import threading

    from sam2serve.timing import core_wait_seconds_since, thread_waits

    if thread_waits() is None:
        pytest.skip("this kernel does not say how long threads wait (no schedstat)")
    core, cores = min(os.sched_getaffinity(0)), os.sched_getaffinity(0)

    def spin_on_the_core(seconds: float) -> None:  # the calling thread, beside the busy process
        os.sched_setaffinity(0, {core})
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    waited_long, may_end = threading.Event(), threading.Event()

    def wait_for_the_core_then_end():
        spin_on_the_core(1.0)
        waited_long.set()
        may_end.wait(30)

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {core})
        ending = threading.Thread(target=wait_for_the_core_then_end)
        ending.start()
        waited_long.wait(30)
        before = thread_waits()
        may_end.set()
        ending.join()  # gone: its half second of waiting before `before` is no longer summed
        assert before[str(ending.native_id)] > 0.2e9
        assert core_wait_seconds_since(before) >= 0.0
        before = thread_waits()
        try:
            spin_on_the_core(1.0)
        finally:
            os.sched_setaffinity(0, cores)
        assert core_wait_seconds_since(before) > 0.2  # about half of the second
    finally:
        busy.kill()
        busy.wait()
