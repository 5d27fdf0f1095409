"""The GPU kit without a GPU: the study's pipeline, float16 numerics and the benchmark script.

- The study's own pipeline (torchao 0.18's copy of SAM2) is CUDA-only only because it pins host
  memory; with pinning made a no-op it runs on a CPU, so its row is checked against sam2's
  generator here, on the trained micro model.
- fast_furious runs in float16 on CUDA and bfloat16 on a CPU, so CPU tests of the fast modes
  never see float16: the same modules are run in float16 here (eager, slow, fine on the micro
  model) and compared with ao.
- tools/gpu_benchmark.sh runs in its CPU dry run (micro model, 4x4 grid, one image): every stage
  and table, so the script cannot rot between GPU runs; the benchmark's per-image table is
  checked on given timings.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from sam2serve import amg
from sam2serve.amg import AMGConfig, MaskGenerator, ReferenceMaskGenerator
from sam2serve.checkpoints import MODEL_SIZES, load_model
from sam2serve.compare import compare_image, summarize
from sam2serve.fast import StaticKernels, fast_kernels, kernel_spec, point_decoder, prepare_model
from sam2serve.model import ImageEncoder
from sam2serve.modes import DECODER_MIB_PER_PROMPT, MODES, build_generator, gpu_points_per_batch
from sam2serve.study import StudyMaskGenerator, build_study_model, retarget, study_unavailable
from training.scenes import make_scene

REPO = Path(__file__).resolve().parents[1]
KEEP_EVERY_CANDIDATE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def scenes():
    # 11 and 13 objects: 16 and 18 masks at sam2's defaults (tests/test_amg.py)
    return [make_scene(np.random.default_rng(seed), 300, 380, min_objects=8, max_objects=14).image
            for seed in (2002, 2004)]


@pytest.fixture()
def pinning_is_a_no_op():
    """What makes the study's code run on a CPU: Tensor.pin_memory returns the tensor."""
    with mock.patch.object(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self):
        yield


def test_study_targets_are_rewritten_to_torchao_and_nothing_else():
    config = {"_target_": "sam2.modeling.sam2_base.SAM2Base", "name": "sam2.keep",
              "layers": [{"_target_": "sam2.modeling.sam.transformer.Attention"}, {"_target_": "torch.nn.GELU"}]}
    assert retarget(config) == {
        "_target_": "torchao._models.sam2.modeling.sam2_base.SAM2Base", "name": "sam2.keep",
        "layers": [{"_target_": "torchao._models.sam2.modeling.sam.transformer.Attention"},
                   {"_target_": "torch.nn.GELU"}],
    }


def test_study_row_is_absent_on_a_cpu_and_says_why():
    assert "CUDA only" in study_unavailable("cpu")


def test_study_pipeline_gives_the_baseline_masks(trained_micro_checkpoint, scenes, pinning_is_a_no_op):
    """Same weights, same settings: the study's 'ao' pipeline and sam2's generator agree."""
    config = AMGConfig()  # sam2's defaults
    study = StudyMaskGenerator(build_study_model(MODEL_SIZES["micro"], trained_micro_checkpoint, "cpu"), config)
    baseline = ReferenceMaskGenerator(load_model(trained_micro_checkpoint, "micro", "cpu").model, config)
    comparisons = [compare_image(str(i), baseline.generate(image), study.generate(image))
                   for i, image in enumerate(scenes)]
    assert all(c.reference_masks >= 10 for c in comparisons)
    summary = summarize(comparisons)
    assert summary.mask_count_mismatch == 0 and summary.miou > 0.999


def test_study_row_answers_no_masks_where_none_pass(trained_micro_checkpoint, scenes, pinning_is_a_no_op):
    """The study's code raises when no mask passes the filters; its row answers no masks, as sam2."""
    config = AMGConfig(points_per_side=4, pred_iou_thresh=1.0)
    study = StudyMaskGenerator(build_study_model(MODEL_SIZES["micro"], trained_micro_checkpoint, "cpu"), config)
    assert study.generate(scenes[0]) == []
    assert study.with_config(replace(config, pred_iou_thresh=0.0)).generate(scenes[0])


def test_study_row_raises_any_other_error_of_the_studys_code():
    """Only the study's failure on an image where no mask passes answers no masks; any other
    error of its code ends the row, not reported as an image without masks."""
    def failing(message):
        def generate(image):
            raise ValueError(message)
        return generate

    study = StudyMaskGenerator.__new__(StudyMaskGenerator)  # its generator only: no model built
    study.generator = SimpleNamespace(generate=failing("torch.cat(): expected a non-empty list of Tensors"))
    assert study.generate(None) == []
    study.generator = SimpleNamespace(generate=failing("the image must be RGB"))
    with pytest.raises(ValueError, match="must be RGB"):
        study.generate(None)
    study.generator = SimpleNamespace(generate=lambda image: [{"segmentation": "a"}, {"segmentation": "b"}])
    assert study.generate(None) == ["a", "b"] and study.generate_batch([None, None]) == [["a", "b"]] * 2


def test_float16_modules_agree_with_ao(trained_micro_checkpoint, scenes):
    """fast_furious's dtype on CUDA, on a CPU: ao's modules in float16 (the prompt encoder in
    float32, as fast_furious), every candidate kept, against ao in float32."""
    config = AMGConfig(points_per_side=8, points_per_batch=64, **KEEP_EVERY_CANDIDATE)
    ao = MaskGenerator(load_model(trained_micro_checkpoint, "micro", "cpu").model, config)
    loaded = load_model(trained_micro_checkpoint, "micro", "cpu")
    spec = replace(kernel_spec(loaded.model, loaded.path, config, half_precision=True), dtype="float16")
    model = prepare_model(loaded.model, spec.torch_dtype)
    assert model.image_encoder.trunk.patch_embed.proj.weight.dtype == torch.float16
    half = MaskGenerator(model, config, fast_kernels(model, StaticKernels(spec, ImageEncoder(model), point_decoder(model, spec))))
    comparisons = [compare_image(str(i), ao.generate(image), half.generate(image)) for i, image in enumerate(scenes)]
    summary = summarize(comparisons)
    print(f"float16 against ao: {summary.line()}")
    # CPUs round float16 differently (AVX2, AVX-512, AVX-512 with bf16): a mask more or fewer
    # among about 90 per image on some, on both images on an AMD EPYC with AVX-512 bf16.
    assert summary.relaxed_miou > 0.98 and (summary.miou is None or summary.miou > 0.98)
    assert all(abs(c.reference_masks - c.candidate_masks) <= 2 for c in comparisons)


def test_half_precision_leaves_float32_modes_alone(trained_micro_checkpoint):
    """fast_furious must not switch the process to TF32: on CUDA that would change the baseline's
    and every float32 mode's numbers in the same process (and make compiled float32 code compile
    again)."""
    before = torch.get_float32_matmul_precision()
    loaded = load_model(trained_micro_checkpoint, "micro", "cpu")
    prepare_model(loaded.model, torch.float16)
    assert torch.get_float32_matmul_precision() == before == "highest"


def test_compiled_kernels_do_not_compile_again_after_warm_up(trained_micro_checkpoint, scenes):
    """Compilation happens before serving: requests after the warm-up compile nothing (sam2's
    position encoding fills a cache on its first call; code compiled before that would compile
    again on the first request)."""
    config = AMGConfig(points_per_side=4, points_per_batch=8)
    generator = build_generator(MODES["fast"], load_model(trained_micro_checkpoint, "micro", "cpu"), config,
                                compile_mode="default")
    graphs = dict(torch._dynamo.utils.counters["stats"])
    for image in scenes:
        generator.generate(image)
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs


MEASURE_DECODER_MEMORY = """
import torch
from sam2serve.checkpoints import MODEL_SIZES, build_random_model
from sam2serve.model import FactoredPointDecoder
from sam2serve.timing import PeakMemory
model = build_random_model(MODEL_SIZES["tiny"], seed=0)
features = (torch.randn(1, 256, 64, 64), torch.randn(1, 32, 256, 256), torch.randn(1, 64, 128, 128))
with torch.inference_mode(), PeakMemory("cpu") as memory:
    FactoredPointDecoder(model, True)(*features, torch.rand(48, 2) * 1024)
print(memory.mib / 48)
"""


def test_decoder_memory_per_prompt_is_what_the_gpu_batch_size_assumes():
    """The decoder's memory per prompt at 1024 pixels, measured here (memory malloc hands out,
    eager, in a fresh process), within 20% of the figure that sizes fast modes' point batches on
    a GPU."""
    result = subprocess.run([sys.executable, "-c", MEASURE_DECODER_MEMORY], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    mib_per_prompt = float(result.stdout.split()[-1])
    assert mib_per_prompt == pytest.approx(DECODER_MIB_PER_PROMPT[False], rel=0.2)


def test_gpu_point_batches_fit_the_card():
    fast, furious = MODES["fast"], MODES["fast_furious"]
    assert gpu_points_per_batch(fast, 143_771) == gpu_points_per_batch(furious, 143_771) == 1024  # H200
    assert gpu_points_per_batch(fast, 81_559) == 1024  # H100 80 GB
    assert gpu_points_per_batch(fast, 24_564) == 512 and gpu_points_per_batch(furious, 24_564) == 1024
    assert gpu_points_per_batch(fast, 8_192) == 128
    assert gpu_points_per_batch(MODES["ao"], 8_192) == 64  # the mode's own, never below


def test_gpu_upscales_chunks_bounded_by_memory_with_the_same_scores():
    # A CPU upscales 4 masks at a time (cache); a GPU as many as fit in UPSCALE_BYTES, also on the
    # largest image the server takes (40 MP), and the chunks change no score.
    gpu, scene = torch.device("cuda"), (768, 1024)
    assert amg.masks_per_upscale(torch.device("cpu"), scene) == amg.UPSCALE_CHUNK
    per_chunk = amg.masks_per_upscale(gpu, scene)
    assert per_chunk * 4 * 768 * 1024 <= amg.UPSCALE_BYTES < (per_chunk + 1) * 4 * 768 * 1024
    assert amg.masks_per_upscale(gpu, (8000, 5000)) == 6 and amg.masks_per_upscale(gpu, (20000, 20000)) == 1

    size = (200, 300)  # under 16 pixels per cell of 64x64 logits: the plain upscale, as on a GPU
    logits = torch.nn.functional.avg_pool2d(torch.randn(37, 1, 68, 68) * 30, 5, stride=1)[:, 0]
    config = AMGConfig()
    cpu_scores = amg.full_resolution_scores(logits, size, config)
    with mock.patch.object(amg, "masks_per_upscale", lambda device, size: 16):
        chunked = amg.full_resolution_scores(logits, size, config)
    assert 0.0 < cpu_scores[0].mean() < 1.0 and cpu_scores[1].any()
    assert torch.equal(cpu_scores[0], chunked[0]) and torch.equal(cpu_scores[1], chunked[1])


def test_gpu_benchmark_dry_run_writes_every_table(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_benchmark.sh"), "--dry-run", "--out", str(out),
                             "--work", str(work)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    timeline = (out / "timeline.txt").read_text()
    assert "failed stages: none" in timeline and "torch " in timeline
    for stage, rows in [("smoke", ["baseline", "ao"]),
                        ("large", ["baseline", "ao", "fast", "fast_furious"]),
                        ("large-off", ["ao", "fast", "fast_furious"]),
                        ("export-save", ["fast_furious"]),
                        ("export-load", ["fast_furious"])]:
        text = (out / f"{stage}.md").read_text()
        assert text.count("| mode | ready s |") == 1, text
        assert all(f"\n| {row} |" in text for row in rows), text
        assert ("\n| baseline |" in text) == ("baseline" in rows), text
        assert text.count("study_ao: not run:") == (1 if stage in ("smoke", "large") else 0), text
    off = (out / "large-off.md").read_text()
    assert "| x ao | peak MiB |" in off and "x study" not in off  # compared with ao; no study row on a CPU
    assert off.count("x ao: that over ao's (a ratio of totals, not of the medians)") == 1  # the legend, once
    large = (out / "large.md").read_text()
    # How the fast modes' kernels were made, said where a fast mode runs.
    assert "fast modes: torch.compile mode " in large and "fast modes:" not in (out / "smoke.md").read_text()
    header, *_ = [line for line in large.splitlines() if line.startswith("| mode |")]
    ao, *_ = [line for line in large.splitlines() if line.startswith("| ao |")]
    held = dict(zip(header.split("|"), ao.split("|")))[" held MiB "]
    assert float(held) >= 4, large  # at least ao's own model: 5.2 MiB of float32 weights
    assert all(f"Profile of {row} on generated-1000, the first table's thresholds: " in large
               for row in ["baseline", "ao", "fast", "fast_furious"])
    assert large.count("| stage | calls | CPU ms |\n") == 3, large  # the project's rows label their stages
    assert large.count("\n| amg.decode | ") >= 3, large
    comparison = (out / "export-compare.md").read_text()
    assert comparison.count("mask count mismatch 0, mIoU 1.000000") == 2, comparison
    # Torch's loader on a small module first: every step passed.
    check = (out / "export-check.md").read_text()
    assert check.count("| yes |") == 4 and "| load in a process of its own | loaded" in check, check
    # The decoder, whole and in halves, in both of its forms: a row each, every cell a time.
    decoder = (out / "decoder.md").read_text()
    for form in ["eager forms", "fusion forms"]:
        row, *_ = [line for line in decoder.splitlines() if line.startswith(f"| {form} |")]
        *times, seconds = [float(cell) for cell in row.split("|")[2:6]]
        assert all(ms > 0 for ms in times) and seconds >= 0, decoder


def gpu_script(tmp_path: Path, python: Path, *arguments: str,
               environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """tools/gpu_benchmark.sh ARGUMENTS run from tmp_path with a stand-in for Python; its default
    work folder in tmp_path (TMPDIR), not the machine's shared one."""
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_benchmark.sh"), *arguments], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHON": str(python), "TMPDIR": str(tmp_path), **(environment or {})})


def test_gpu_benchmark_script_checks_its_arguments_and_counts_a_failed_comparison(tmp_path):
    """The script's own logic, against a stand-in for Python (seconds, no torch): a stage name
    it does not know, an option without its value, relative folders, an earlier run's masks
    named as such, an export comparison that fails, an export skipped where export-check did
    not pass, the run's time limit (an export stage not started with less than it needs), and a
    stop."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n"
                    'case "$1" in\n'
                    '    -) cat >/dev/null; echo "python stub" ;;\n'
                    '    compare_rle_lists.py) echo "error: line 1: mask sizes differ" >&2; exit 1 ;;\n'
                    '    -m) if [[ $2 == tools.aoti_check && -n ${STUB_LOADER_CRASHES:-} ]]; then\n'
                    """            echo "| load in a process of its own | torch's loader crashed (SIGSEGV) | no |"; exit 1\n"""
                    "        fi ;;&\n"
                    '    -m) [[ -z ${STUB_SLEEP:-} ]] || { echo $$ >"$STUB_SLEEP.part"; mv "$STUB_SLEEP.part" "$STUB_SLEEP"; '
                    "exec sleep 60; } ;;\n"
                    "    *) exit 0 ;;\n"
                    "esac\n")
    stub.chmod(0o755)

    def script(*arguments: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return gpu_script(tmp_path, stub, *arguments, environment=environment)

    refused = script("--dry-run", "--stages", "smoke larg", "--out", "never")
    assert refused.returncode == 2 and "no stage 'larg'" in refused.stderr and not (tmp_path / "never").exists()
    refused = script("--dry-run", "--wheels")
    assert refused.returncode == 2 and "usage:" in refused.stderr and "unbound" not in refused.stderr
    refused = script("--dry-run", "--stages", " ")  # ran nothing, and said done
    assert refused.returncode == 2 and "--stages names no stage" in refused.stderr
    # A wheel folder not filled yet: named (the message read "no wheel folder "), and no folder made
    refused = script("--wheels", "wheels", "--out", "never", "--work", "nor")
    assert refused.returncode == 1 and "error: no wheel folder wheels (make gpu-wheels" in refused.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "nor").exists()

    earlier = tmp_path / "work" / "masks" / "compiled" / "off_fast_furious.jsonl"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}\n")
    os.utime(earlier, (1577934240, 1577934240))  # 2020-01-02 03:04 UTC
    result = script("--dry-run", "--stages", "export", "--out", "out", "--work", "work")  # relative: from here
    assert result.returncode == 1
    assert "failed stages: export-compare" in (tmp_path / "out" / "timeline.txt").read_text()
    comparison = (tmp_path / "out" / "export-compare.md").read_text()
    assert f"torch.compile (stage large-off of an earlier run in {tmp_path / 'work'}, 2020-01-02 03:04 UTC" in comparison
    script("--dry-run", "--stages", "large-off export", "--out", "out", "--work", "work")
    comparison = (tmp_path / "out" / "export-compare.md").read_text()
    assert not earlier.exists() and "torch.compile: none (stage large-off did not write them)" in comparison

    # Where export-check's small module does not pass (torch's loader crashes), the export is not tried.
    result = script("--dry-run", "--stages", "export", "--out", "out", environment={"STUB_LOADER_CRASHES": "1"})
    timeline = (tmp_path / "out" / "timeline.txt").read_text()
    assert result.returncode == 1 and "skip export-save, export-load: export-check did not pass" in timeline
    assert "start export-save" not in timeline and not (tmp_path / "out" / "export-save.md").exists()
    assert "failed stages: export-check\n" in timeline
    # Less time left than an export stage needs: not started (cut short, it measured nothing), and
    # export-check skipped is not said to have failed.
    result = script("--dry-run", "--stages", "export", "--out", "out", environment={"TOTAL_SECONDS": "100"})
    timeline = (tmp_path / "out" / "timeline.txt").read_text()
    assert result.returncode == 1 and "skip export-check: " in timeline and "did not pass" not in timeline
    assert "skip export-save, export-load: export-check was not run (no time left)" in timeline
    result = script("--dry-run", "--stages", "export", "--out", "out", environment={"TOTAL_SECONDS": "150"})
    timeline = (tmp_path / "out" / "timeline.txt").read_text()
    assert "end export-check: exit status 0" in timeline and "start export-save" not in timeline
    assert "skip export-save: " in timeline and "it needs 200 s" in timeline

    # The run's time: a stage that cannot start is skipped (TOTAL_SECONDS is scaled by 10 in a
    # dry run, less 15 s kept for the end); one running when the script is stopped stops with it.
    result = script("--dry-run", "--stages", "smoke large", "--out", "out", environment={"TOTAL_SECONDS": "3"})
    timeline = (tmp_path / "out" / "timeline.txt").read_text()
    assert result.returncode == 1 and "skip smoke: " in timeline and "skip large: " in timeline
    assert "failed stages: smoke (no time left) large (no time left)" in timeline
    assert (tmp_path / "out" / "export-check.md").exists()  # a stage not run keeps its earlier table
    for sent, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        sleeper = tmp_path / f"sleeper-{sent.name}.pid"
        # SIGINT as a terminal sends it: where the tests were started in the background (`&`),
        # it is ignored, and bash cannot trap a signal ignored when it started.
        running = subprocess.Popen(["bash", str(REPO / "tools" / "gpu_benchmark.sh"), "--dry-run", "--stages",
                                    "smoke", "--out", "out"], cwd=tmp_path,
                                   env={**os.environ, "PYTHON": str(stub), "STUB_SLEEP": str(sleeper),
                                        "TMPDIR": str(tmp_path)},
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        stage = None
        try:
            deadline = time.monotonic() + 30
            while not sleeper.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            stage = int(sleeper.read_text())
            running.send_signal(sent)
            try:
                exit_status = running.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the script outlived {sent.name} by 30 s:\n{process_tree(running.pid)}") from None
            assert exit_status == status, sent.name
            deadline = time.monotonic() + 15
            while process_exists(stage) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not process_exists(stage), f"the stage outlived the script ({sent.name})"
        finally:
            running.kill()
            if stage is not None and process_exists(stage):
                os.kill(stage, signal.SIGKILL)
        assert f"stopped by {sent.name}" in (tmp_path / "out" / "timeline.txt").read_text()


def test_gpu_benchmark_dry_run_gives_its_stages_ten_times_the_time_in_a_folder_of_its_own(tmp_path):
    """A dry run (a CPU compiles for minutes) gives each stage ten times its seconds, and works in
    WORK's -dry folder by default, whose micro model's masks are never taken for a real run's."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n[[ $1 == - ]] && cat >/dev/null\nexit 0\n")
    stub.chmod(0o755)
    result = gpu_script(tmp_path, stub, "--dry-run", "--stages", "smoke", "--out", "out")
    assert result.returncode == 0, result.stderr
    timeline = (tmp_path / "out" / "timeline.txt").read_text()
    assert f"start smoke (at most 300 s): {stub} -m tools.benchmark --generated 1 " in timeline, timeline
    assert (tmp_path / "sam2-gpu-benchmark-dry").is_dir() and not (tmp_path / "sam2-gpu-benchmark").exists()


def test_gpu_benchmark_compares_the_export_with_this_runs_compiled_masks_and_loads_only_a_saved_export(tmp_path):
    """Against a stand-in for Python that writes the masks asked for: stage large-off compares
    the fast modes with ao, and the export stage names its masks as this run's; an export that
    failed to save is not loaded, nor compared."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n"
                    '[[ $1 == - ]] && { cat >/dev/null; exit 0; }\n'
                    '[[ $1 == compare_rle_lists.py ]] && { echo "mask count mismatch 0"; exit 0; }\n'
                    '[[ -n ${STUB_SAVE_FAILS:-} && " $* " == *" --save-fast "* ]] && exit 1\n'
                    'while (($#)); do [[ $1 == --save-masks ]] && mkdir -p "$2" && echo "{}" >"$2/off_fast_furious.jsonl"; '
                    "shift; done\n")
    stub.chmod(0o755)

    def script(stages: str, **environment: str) -> str:
        gpu_script(tmp_path, stub, "--dry-run", "--stages", stages, "--out", "out", "--work", "work",
                   environment=environment)
        return (tmp_path / "out" / "timeline.txt").read_text()

    timeline = script("large-off export")
    assert "failed stages: none" in timeline, timeline
    large_off, *_ = [line for line in timeline.splitlines() if "start large-off" in line]
    assert " --modes ao fast fast_furious --reference ao " in large_off
    assert "- those of torch.compile (stage large-off, the same scene): mask count mismatch 0" in (
        tmp_path / "out" / "export-compare.md").read_text()

    timeline = script("export", STUB_SAVE_FAILS="1")
    assert "end export-save: exit status 1" in timeline and "failed stages: export-save\n" in timeline, timeline
    assert "start export-load" not in timeline and not (tmp_path / "out" / "export-compare.md").exists()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_tree(pid: int) -> str:
    """A process and those below it, each with its state, the signals it ignores, catches and
    blocks, and where it waits (Linux's /proc): why one outlived a signal."""
    lines, pending = [], [pid]
    while pending:
        pid = pending.pop()
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            pending += [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:  # ended meanwhile
            continue
        lines.append(f"{pid} {command[:100]!r}: " + ", ".join(
            f"{field} {status[field].strip()}" for field in ("State", "SigIgn", "SigCgt", "SigBlk")) + f", waits in {wchan}")
    return "\n".join(lines)


def test_aoti_check_stops_at_the_first_step_that_fails(monkeypatch, tmp_path):
    """export-check's steps, with AOTInductor and torch's loader replaced (the GPU script's dry
    run runs the real ones): a loader that fails in a process of its own ends the check with
    why; a loaded module is run against its eager self, within 1e-4 on a CPU; an export that
    fails ends it at once."""
    from tools import aoti_check

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda exported, package_path: Path(package_path).write_bytes(b"package"))
    monkeypatch.setattr(aoti_check, "load_failure_elsewhere", lambda packages, index: "torch's loader crashed (SIGSEGV)")
    steps = list(aoti_check.steps(torch.device("cpu"), tmp_path))
    assert [(step, passed) for step, _, passed in steps] == [("export (torch.export + AOTInductor)", True),
                                                             ("load in a process of its own", False)]
    assert steps[1][1] == "torch's loader crashed (SIGSEGV)"

    def eager_module(offset):  # the check's module, built again from its seed, its output moved by offset
        torch.manual_seed(0)
        module = aoti_check.SmallModule().eval()
        return lambda path, device_index: (lambda image: module(image) + offset)

    monkeypatch.setattr(aoti_check, "load_failure_elsewhere", lambda packages, index: None)
    for offset, passed in [(0.0, True), (1e-3, False)]:
        monkeypatch.setattr(torch._inductor, "aoti_load_package", eager_module(offset))
        *_, (step, result, ok) = aoti_check.steps(torch.device("cpu"), tmp_path)
        assert step == "run against eager" and ok is passed and result.endswith("(at most 0.0001)"), result

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", raising(RuntimeError("no C++ compiler\nmore")))
    assert list(aoti_check.steps(torch.device("cpu"), tmp_path)) == [
        ("export (torch.export + AOTInductor)", "RuntimeError: no C++ compiler", False)]


@pytest.mark.parametrize("passed, status", [([True] * 4, 0), ([True] * 3, 1), ([True, True, False, True], 1)])
def test_aoti_check_exits_0_only_where_all_four_steps_passed(passed, status, monkeypatch, capsys):
    """A check cut short (fewer than four rows) or with a step that failed exits 1: the GPU
    script then skips the fast modes' export."""
    from tools import aoti_check

    monkeypatch.setattr(aoti_check, "steps", lambda device, folder: [(f"step {i}", "result", ok)
                                                                      for i, ok in enumerate(passed)])
    monkeypatch.setattr(sys, "argv", ["aoti_check.py", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit:
        aoti_check.main()
    assert exit.value.code == status
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| step ")]
    assert rows[1:] == [f"| step {i} | result | {'yes' if ok else 'no'} |" for i, ok in enumerate(passed)]


def raising(error: Exception):
    def call(*args, **kwargs):
        raise error
    return call


def test_benchmark_per_image_table_gives_each_image_its_own_ratio():
    from tools.benchmark import ModeRun, per_image_table

    images = [("photo", None), ("scene", None)]
    baseline = ModeRun("baseline", repeats={0: [2.0, 2.2, 9.0], 1: [8.0]})
    ao = ModeRun("ao", repeats={0: [1.1], 1: [1.0]})
    lines = per_image_table([baseline, ao], images).splitlines()
    assert lines[0] == "| image | baseline ms (x baseline) | ao ms (x baseline) |"
    assert lines[2:] == ["| photo | 2200 (1.00) | 1100 (2.00) |", "| scene | 8000 (1.00) | 1000 (8.00) |"]


def test_benchmark_tables_compare_with_ao_where_it_is_the_reference():
    """--reference ao: the rows are compared with ao, which gives the baseline's masks, in the
    columns named after it."""
    from sam2serve.rle import masks_to_rle_vectorized
    from tools.benchmark import ModeRun, per_image_table, table

    square, half = torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    square[0, :4, :4] = half[0, :4, :2] = True
    ao = ModeRun("ao", seconds=[1.0], masks={0: masks_to_rle_vectorized(square)}, repeats={0: [1.0]})
    fast = ModeRun("fast_furious", seconds=[0.25], masks={0: masks_to_rle_vectorized(half)}, repeats={0: [0.25]})
    header, _, _, row = table([ao, fast], 1, reference="ao").splitlines()
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" x ao "] == " 4.00 " and cells[" mIoU vs ao "] == " 0.500000 " and cells[" mask count mismatch "] == " 0/1 "
    assert per_image_table([ao, fast], [("photo", None)], reference="ao").splitlines() == [
        "| image | ao ms (x ao) | fast_furious ms (x ao) |", "|---|---|---|", "| photo | 1000 (1.00) | 250 (4.00) |"]
    alone = table([fast], 1, reference="ao").splitlines()[2]
    assert alone.endswith("| n/a | n/a | n/a |")  # without ao's row, nothing to compare with


def test_benchmark_table_has_a_study_column_only_where_the_study_ran():
    from tools.benchmark import STUDY_ROW, ModeRun, table, table_legend

    ao = ModeRun("ao", seconds=[0.5], masks={0: []})
    study = ModeRun(STUDY_ROW, seconds=[2.0], masks={0: []})
    header, _, row, _ = table([ao, study], 1, reference="ao").splitlines()
    assert dict(zip(header.split("|"), row.split("|")))[" x study "] == " 4.00 "
    header, _, row = table([ao], 1, reference="ao").splitlines()
    assert "x study" not in header and row.count("|") == header.count("|")
    assert "x study" in table_legend("ao", with_study=True) and "x study" not in table_legend("ao")


def test_benchmark_names_image_files_by_their_name_where_no_two_share_one(tmp_path):
    import argparse

    from tools.benchmark import load_images

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for name in ("one.png", "two.png"):
            Image.new("RGB", (4, 3)).save(tmp_path / folder / name)
    parser = argparse.ArgumentParser()
    unique = [str(tmp_path / "a" / "one.png"), str(tmp_path / "b" / "two.png")]
    assert [name for name, _ in load_images(parser, argparse.Namespace(images=unique))] == ["one.png", "two.png"]
    shared = [str(tmp_path / "a" / "one.png"), str(tmp_path / "b" / "one.png")]
    assert [name for name, _ in load_images(parser, argparse.Namespace(images=shared))] == shared


def test_benchmark_tables_without_the_baseline_compare_with_nothing():
    from tools.benchmark import ModeRun, per_image_table, table

    images = [("photo", None), ("scene", None)]
    loaded = ModeRun("fast_furious", seconds=[0.5, 0.25], masks={0: [], 1: []}, repeats={0: [0.5], 1: [0.25]})
    header, _, row = table([loaded], len(images)).splitlines()
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" images/s "] == " 2.667 " and cells[" masks per image "] == " 0.0 "
    assert cells[" x baseline "] == cells[" mIoU vs baseline "] == cells[" relaxed mIoU "] == " n/a "
    assert cells[" mask count mismatch "] == " n/a "
    assert per_image_table([loaded], images).splitlines()[2:] == ["| photo | 500 |", "| scene | 250 |"]


def test_benchmark_table_says_what_a_mode_costs_even_when_every_image_is_a_mismatch():
    """Strict mIoU leaves out every image whose mask count differs; the relaxed one still
    says how far the masks moved."""
    from sam2serve.rle import masks_to_rle_vectorized
    from tools.benchmark import ModeRun, table

    square, half = torch.zeros(2, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    square[0, :4, :4] = square[1, 4:, 4:] = half[0, :4, :2] = True
    baseline = ModeRun("baseline", seconds=[1.0], masks={0: masks_to_rle_vectorized(square)})
    other = ModeRun("fast_furious", seconds=[0.5], masks={0: masks_to_rle_vectorized(half)})
    header, _, _, row = table([baseline, other], 1).splitlines()
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" mIoU vs baseline "] == " n/a " and cells[" mask count mismatch "] == " 1/1 "
    assert cells[" relaxed mIoU "] == " 0.250000 "  # IoU 0.5 with one square, the other unmatched


def test_a_refused_package_is_noted_with_what_differs():
    from sam2serve.fast import PackageMismatch
    from tools.benchmark import failure_reason

    error = PackageMismatch("the exported kernels in x were built for something else:\n  points_per_batch: "
                            "package 8, server 16\nexport them again for this server with --save-fast")
    assert failure_reason(error) == ("the exported kernels in x were built for something else: points_per_batch: "
                                     "package 8, server 16; export them again for this server with --save-fast")
    assert failure_reason(RuntimeError("CUDA graphs went wrong\nand a traceback")) == "CUDA graphs went wrong"


def test_benchmark_leaves_out_a_failing_row_and_tries_a_fast_mode_again_in_the_default_mode(monkeypatch):
    from tools import benchmark

    calls = []

    def load_row(row, parser, args, thresholds, compile_mode=None):
        calls.append((row, compile_mode))
        if row == "fast" and compile_mode is None:
            raise RuntimeError("CUDA graphs went wrong\nand a traceback")
        if row == "ao":
            raise ValueError("broken")

        def generate(image):  # the untimed first request on CUDA
            if row == "study_ao":
                raise RuntimeError("the study's code failed")
            return []

        return SimpleNamespace(config=SimpleNamespace(points_per_batch=64), generate=generate)

    monkeypatch.setattr(benchmark, "load_row", load_row)
    args = SimpleNamespace(device="cuda", compile_mode="reduce-overhead", reference="baseline", save_fast=None,
                           load_fast=None)
    rows = ["baseline", "ao", "fast", "fast_furious", "study_ao"]
    generators, ready, notes = benchmark.ready_rows(rows, None, args, {}, first_image=None)
    assert list(generators) == list(ready) == ["baseline", "fast", "fast_furious"]
    assert calls == [("baseline", None), ("ao", None), ("fast", None), ("fast", "default"), ("fast_furious", None),
                     ("study_ao", None)]
    assert notes == {
        "ao": "failed: ValueError: broken",
        "fast": "failed in compile mode reduce-overhead: RuntimeError: CUDA graphs went wrong; its row is compiled "
                "in the default mode",
        "study_ao": "failed: RuntimeError: the study's code failed",
    }
    monkeypatch.setattr(benchmark, "load_row", lambda row, *rest: load_row("ao", *rest))
    with pytest.raises(ValueError, match="broken"):  # every row is compared with the baseline
        benchmark.ready_rows(["baseline", "fast"], None, args, {}, first_image=None)
    monkeypatch.setattr(benchmark, "load_row", load_row)
    with pytest.raises(ValueError, match="broken"):  # or with ao, where it is the reference
        benchmark.ready_rows(["ao", "fast"], None, SimpleNamespace(**{**vars(args), "reference": "ao"}), {},
                             first_image=None)


def test_benchmark_rows_export_to_and_load_from_a_folder_of_their_own(monkeypatch):
    """--save-fast DIR / --load-fast DIR: each fast mode's kernels in DIR/<mode> (fast and
    fast_furious are built for different dtypes), for --cpu-target's CPU, none for an eager mode;
    a row tried again runs in the compile mode it is given; the study's row takes ao's settings."""
    from sam2serve.study import STUDY_ROW
    from tools import benchmark

    loaded, configs = [], []
    monkeypatch.setattr(benchmark, "amg_config", lambda parser, args, mode: configs.append(mode.name) or AMGConfig())
    monkeypatch.setattr(benchmark, "load_pipeline",
                        lambda *arguments, **options: loaded.append((arguments, options)) or SimpleNamespace(generator=1))
    args = SimpleNamespace(checkpoint_dir="checkpoints", model_type="micro", device="cpu",
                           compile_mode="reduce-overhead", save_fast="kernels", load_fast=None, cpu_target="x86-64-v3")
    off = {"pred_iou_thresh": 0.0}
    assert benchmark.load_row("fast", None, args, off) == 1
    benchmark.load_row("fast_furious", None, args, off, compile_mode="default")
    benchmark.load_row("ao", None, args, off)
    benchmark.load_row("fast", None, SimpleNamespace(**{**vars(args), "save_fast": None, "load_fast": "saved"}), off)
    assert [arguments for arguments, _ in loaded] == [("checkpoints", "micro", row, "cpu")
                                                      for row in ("fast", "fast_furious", "ao", "fast")]
    options = [{key: value for key, value in kwargs.items() if key != "config"} for _, kwargs in loaded]
    assert options == [
        {"compile_mode": "reduce-overhead", "save_fast": Path("kernels/fast"), "cpu_target": "x86-64-v3"},
        {"compile_mode": "default", "save_fast": Path("kernels/fast_furious"), "cpu_target": "x86-64-v3"},
        {"compile_mode": "reduce-overhead"},
        {"compile_mode": "reduce-overhead", "load_fast": Path("saved/fast")},  # (a target is the export's)
    ]
    assert all(kwargs["config"] == AMGConfig(pred_iou_thresh=0.0) for _, kwargs in loaded)

    studied = []
    monkeypatch.setattr(benchmark, "resolve_checkpoint", lambda folder, model_type: (Path("micro.pt"), "micro"))
    monkeypatch.setattr(benchmark, "build_study_model", lambda size, path, device: (size.name, path, device))
    monkeypatch.setattr(benchmark, "StudyMaskGenerator", lambda model, config: studied.append((model, config)))
    configs.clear()
    benchmark.load_row(STUDY_ROW, None, args, off)
    assert configs == ["ao"] and studied == [(("micro", Path("micro.pt"), "cpu"), AMGConfig(pred_iou_thresh=0.0))]


def test_benchmark_tries_a_fast_row_again_only_where_it_did_not_fail_in_the_default_mode(monkeypatch):
    """A fast row that fails in torch.compile's default mode, or on a CPU in its eager kernels,
    is not tried again; one that fails in the mode a CUDA device compiles in when none is given
    (max-autotune) is tried again in the default mode, unless it was exported or loaded (an
    export of minutes, or the same loader's crash, again)."""
    from tools import benchmark

    calls = []

    def load_row(row, parser, args, thresholds, compile_mode=None):
        calls.append((row, compile_mode))
        raise RuntimeError("compilation failed")

    monkeypatch.setattr(benchmark, "load_row", load_row)
    for device, compile_mode in (("cuda", "default"), ("cpu", None)):
        calls.clear()
        args = SimpleNamespace(device=device, compile_mode=compile_mode, reference="baseline", save_fast=None,
                               load_fast=None)
        generators, _, notes = benchmark.ready_rows(["fast"], None, args, {}, first_image=None)
        assert calls == [("fast", None)] and generators == {}
        assert notes == {"fast": "failed: RuntimeError: compilation failed"}
    calls.clear()
    args = SimpleNamespace(device="cuda", compile_mode=None, reference="baseline", save_fast=None, load_fast=None)
    _, _, notes = benchmark.ready_rows(["fast"], None, args, {}, first_image=None)
    assert calls == [("fast", None), ("fast", "default")]
    assert notes == {"fast": "failed in compile mode max-autotune: RuntimeError: compilation failed; "
                             "failed in compile mode default: RuntimeError: compilation failed"}
    for exported in ({"save_fast": "kernels"}, {"load_fast": "kernels"}):  # AOTInductor's, in any mode
        calls.clear()
        _, _, notes = benchmark.ready_rows(["fast"], None, SimpleNamespace(**{**vars(args), **exported}), {},
                                           first_image=None)
        assert calls == [("fast", None)] and notes == {"fast": "failed: RuntimeError: compilation failed"}


def test_benchmark_says_how_the_fast_modes_kernels_were_made():
    from tools.benchmark import fast_kernels_description

    def described(device="cpu", compile_mode=None, save_fast=None, load_fast=None, cpu_target="native"):
        return fast_kernels_description(SimpleNamespace(device=device, compile_mode=compile_mode, save_fast=save_fast,
                                                        load_fast=load_fast, cpu_target=cpu_target))

    assert described(load_fast="k") == "kernels loaded from k/<mode>"
    assert described(save_fast="k") == "kernels exported to k/<mode> (torch.export + AOTInductor), then loaded"
    assert described(save_fast="k", cpu_target="x86-64-v3") == (
        "kernels exported for x86-64-v3 to k/<mode> (torch.export + AOTInductor), then loaded")
    assert described() == "ao's eager kernels in their precision (on a CPU; --compile-mode compiles them)"
    assert described(compile_mode="default") == "torch.compile mode default"
    assert described("cuda") == "torch.compile mode max-autotune"
    assert described("cuda:1", "reduce-overhead") == "torch.compile mode reduce-overhead"


def test_benchmark_saves_each_rows_masks_under_its_tables_name(tmp_path):
    """--save-masks: DIR/<row>.jsonl, or DIR/<filters>_<row>.jsonl with --filters, an
    /upload_rle answer per image and line, in the images' order."""
    from sam2serve.rle import answer_text, masks_to_rle_vectorized
    from tools.benchmark import ModeRun, save_masks

    square = torch.zeros(1, 4, 4, dtype=torch.bool)
    square[0, :2, :2] = True
    masks = masks_to_rle_vectorized(square)
    runs = {"ao": ModeRun("ao", masks={1: masks, 0: []}), "fast": ModeRun("fast", masks={0: masks, 1: masks})}
    save_masks(tmp_path / "masks", "off", runs, 2)
    save_masks(tmp_path / "masks", None, runs, 2)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["ao.jsonl", "fast.jsonl", "off_ao.jsonl",
                                                                      "off_fast.jsonl"]
    assert (tmp_path / "masks" / "off_ao.jsonl").read_text() == answer_text([]) + "\n" + answer_text(masks) + "\n"
    assert (tmp_path / "masks" / "fast.jsonl").read_text() == (answer_text(masks) + "\n") * 2


def test_prompt_benchmark_reports_the_median_of_each_measurement_and_the_cached_speed_up(monkeypatch, capsys):
    """tools/benchmark_prompts.py on the micro model, its clock replaced: a row per measurement
    (the median of its times), then how many times faster a cached image answers one point than
    a new one; its prompts fall inside each image (x across its width, y down its height)."""
    from tools import benchmark_prompts

    wide = np.zeros((10, 100, 3), dtype=np.uint8)
    points = np.array(benchmark_prompts.point_prompts(wide, 200, seed=0))
    assert (points >= 0).all() and (points[:, 0] < 100).all() and (points[:, 1] < 10).all()
    assert points[:, 0].max() > 50

    times = [40.0, 4.0, 8.0, 50.0, 5.0, 60.0,  # image 1: ours new, cached, 32 points; sam2's three
             20.0, 2.0, 6.0, 30.0, 3.0, 40.0,  # image 1 again (--repeats 2)
             90.0, 3.0, 7.0, 70.0, 7.0, 80.0,  # image 2
             95.0, 1.0, 9.0, 75.0, 8.0, 85.0]
    calls = []

    def timed(device, function):
        if len(calls) < 6:  # each measurement's request runs once (sam2's 32 calls take seconds here)
            function()
        calls.append(function)
        return times[len(calls) - 1]

    monkeypatch.setattr(benchmark_prompts, "timed", timed)
    set_up = []  # not this process's settings: only what they would have been
    monkeypatch.setattr(benchmark_prompts, "set_up_cpu_process", lambda *arguments: set_up.append(arguments))
    monkeypatch.setattr(benchmark_prompts, "make_scene", lambda rng, height, width: make_scene(rng, 64, 80))
    monkeypatch.setattr(sys, "argv", ["benchmark_prompts.py", "--generated", "2", "--repeats", "2", "--device", "cpu",
                                      "--threads", "1"])
    benchmark_prompts.main()
    assert set_up == [("cpu", 1)]
    out = capsys.readouterr().out
    threads = torch.get_num_threads()
    assert f"; device CPU ({threads} thread{'' if threads == 1 else 's'}); 2 images (80x64), 2 repeats; torch " in out
    assert out.split("| measurement | ms (median) |\n|---|---|\n")[1].splitlines()[:6] == [
        "| ours: new image (encode + 1 point) | 65.0 |", "| ours: cached image, 1 point | 2.5 |",
        "| ours: cached image, 32 points in one request | 7.5 |", "| sam2 predictor: set_image + predict | 60.0 |",
        "| sam2 predictor: predict, 1 point | 6.0 |", "| sam2 predictor: 32 predict calls | 70.0 |"]
    assert "A cached image answers one point 26.0x faster than a new one." in out


def test_benchmark_that_lost_a_row_prints_its_tables_and_fails(tmp_path):
    """A row that could not be made ready is noted under the tables, and the run exits with 1:
    the GPU script counts that stage as failed. (--threads: the rows run on that many.)"""
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tools.benchmark", "--generated", "1", "--size", "64", "64", "--points-per-side", "2",
         "--modes", "fast_furious", "--load-fast", str(tmp_path / "empty"), "--threads", "1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "; device CPU (1 thread);" in result.stdout
    assert "| baseline |" in result.stdout and "fast_furious: failed" in result.stdout
    assert "rows that failed and are missing from the tables: fast_furious" in result.stderr


def test_benchmark_whose_baseline_failed_says_the_ablation_was_not_timed(tmp_path):
    """With another reference the baseline's row may fail and the tables go on; the ablation,
    which times the baseline's model, ended in a KeyError before the failed rows were named."""
    script = tmp_path / "failing_baseline.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tools import benchmark

load_row = benchmark.load_row


def failing_baseline(row, *rest, **options):
    if row == "baseline":
        raise RuntimeError("the baseline broke")
    return load_row(row, *rest, **options)


benchmark.load_row = failing_baseline
sys.argv = ["benchmark.py", "--generated", "1", "--size", "64", "64", "--points-per-side", "2", "--modes", "baseline", "ao",
            "--reference", "ao", "--ablation"]
benchmark.main()
""")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "KeyError" not in result.stderr, result.stderr
    assert "| ao |" in result.stdout and "baseline: failed: RuntimeError: the baseline broke" in result.stdout
    assert "Mask decoder alone: not timed: the baseline's row, whose model it times, failed" in result.stdout
    assert "rows that failed and are missing from the tables: baseline" in result.stderr


def test_benchmark_warms_each_row_up_on_one_batch_of_points_on_a_cpu(monkeypatch):
    """On a CPU each row runs once untimed on a grid of one batch of points (its first request's
    one-off costs would otherwise be timed), not the whole grid (sam2's decoder is slow there)."""
    from tools import benchmark

    warmed = []

    class Row:
        config = AMGConfig(points_per_side=32, points_per_batch=64)

        def with_config(self, config):
            copy = Row()
            copy.config = config
            return copy

        def generate(self, image):
            warmed.append(self.config.points_per_side)

    monkeypatch.setattr(benchmark, "load_row", lambda *arguments, **options: Row())
    args = SimpleNamespace(device="cpu", compile_mode=None)
    generators, _, _ = benchmark.ready_rows(["baseline", "ao"], None, args, {}, first_image=None)
    assert warmed == [8, 8] and [g.config.points_per_side for g in generators.values()] == [32, 32]
    small = benchmark.warm_up_grid(AMGConfig(points_per_side=4, points_per_batch=64))
    assert (small.points_per_side, benchmark.warm_up_grid(AMGConfig(points_per_batch=8)).points_per_side) == (4, 3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_profile_table_gives_the_stages_and_the_operations_that_take_the_most(device, monkeypatch, capfd):
    from torch.profiler import record_function

    from tools import benchmark

    class Generator:
        matrix, vector = torch.randn(400, 400), torch.randn(100)

        def generate(self, image):
            with record_function("amg.encode"):
                self.matrix @ self.matrix
            for _ in range(2):
                with record_function("amg.decode"):
                    self.vector.relu()
            return []

    # On a CPU-only machine the CUDA branch can still be read: nothing to synchronise, no kernels.
    stopwatch = benchmark.Stopwatch
    monkeypatch.setattr(benchmark, "Stopwatch", lambda device: stopwatch("cpu"))
    lines = benchmark.profile_table(Generator(), image=None, device=device, top=3).splitlines()
    assert lines[0].endswith("ms under the profiler.")
    stage_header = "| stage | calls | CPU ms |" + (" device ms (kernels launched in it) |" if device == "cuda" else "")
    stages = lines.index(stage_header)
    assert [line.split(" | ")[:2] for line in lines[stages + 2 : stages + 4]] == [["| amg.encode", "1"],
                                                                                  ["| amg.decode", "2"]]
    clock = "device" if device == "cuda" else "CPU"
    operations = lines.index(f"| operation | calls | own {clock} ms | share |")
    assert len(lines) == operations + 2 + 3
    if device == "cpu":
        # The product is listed (first, unless the machine's other work paused a relu longer).
        assert any(line.startswith("| aten::mm | 1 |") for line in lines[operations + 2:])
        assert capfd.readouterr().err == ""  # no "gpuGetDeviceCount failed" from the profiler's library


def test_the_wheel_script_takes_no_option_for_its_folder(tmp_path):
    """`tools/gpu_wheels.sh --help` prints its usage: it had made a folder named --help and
    downloaded the wheels into it. Nothing is made or downloaded (PYTHON, here `false`, would
    end the script with status 1 at the download)."""
    for arguments in (["--help"], ["-h"], ["two-folders", "given"]):
        result = subprocess.run(["bash", str(REPO / "tools" / "gpu_wheels.sh"), *arguments], cwd=tmp_path,
                                env={**os.environ, "PYTHON": "false"}, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and result.stderr.startswith("usage: "), (arguments, result.stderr)
        assert not (REPO / arguments[0]).exists() and not list(tmp_path.iterdir())


def test_gpu_scripts_pass_shellcheck():
    shellcheck = str(Path(sys.executable).with_name("shellcheck"))
    for script in ("gpu_benchmark.sh", "gpu_wheels.sh"):
        result = subprocess.run([shellcheck, str(REPO / "tools" / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_benchmark_spread_table_gives_min_median_max_and_max_over_min():
    """--repeat: the same request's fastest, median and slowest ms per row and image, and the
    slowest over the fastest (at least 1)."""
    from tools.benchmark import ModeRun, spread_table

    images = [("photo", None), ("scene", None)]
    ao = ModeRun("ao", repeats={1: [0.3, 0.1, 0.2], 0: [0.5, 0.4]})
    lines = spread_table([ao], images).splitlines()
    assert lines[0] == "| mode | image | requests | min ms | median ms | max ms | max / min |"
    assert lines[2:] == ["| ao | photo | 2 | 400 | 450 | 500 | 1.25 |", "| ao | scene | 3 | 100 | 200 | 300 | 3.00 |"]


def test_benchmark_says_how_long_each_rows_threads_waited_for_a_core(monkeypatch):
    """A run measured while other work took the cores gave times that were not the rows' own,
    and said nothing of it: each row's threads' wait for a core (timing.core_wait_seconds_since)
    during its requests is summed, and a share over CORE_WAIT_WARN_PCT is warned of."""
    from tools import benchmark
    from tools.benchmark import ModeRun, core_wait_line

    class Stub:
        def generate(self, image):
            time.sleep(0.05)
            return []

    waits = iter([3.0, 0.0, 1.0, 0.0])  # each request's, rows taking turns
    monkeypatch.setattr(benchmark, "core_wait_seconds_since", lambda before: next(waits))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    runs = benchmark.measure({"baseline": Stub(), "ao": Stub()}, [("a", None), ("b", None)], 1, "cpu")
    assert (runs["baseline"].core_wait_seconds, runs["ao"].core_wait_seconds) == (4.0, 0.0)
    line = core_wait_line(list(runs.values()))
    baseline_share = 100 * 4.0 / (sum(runs["baseline"].seconds) * 2)
    assert line == (f"Waited for a core, share of each row's timed requests (its model's threads): baseline "
                    f"{baseline_share:.1f}%, ao 0.0%; over 10%: other work was on the cores, these times are not "
                    "the rows' own")
    quiet = [ModeRun("ao", seconds=[1.0], core_wait_seconds=0.1),
             ModeRun("fast", seconds=[1.0], core_wait_seconds=None)]
    assert core_wait_line(quiet) == ("Waited for a core, share of each row's timed requests (its model's threads): "
                                     "ao 5.0%")
    assert core_wait_line(quiet[1:]) is None  # where the kernel does not say
    # On a GPU, the one thread that sends it work (a share of torch's CPU threads understated it).
    assert core_wait_line(quiet[:1], "cuda").endswith("ao 10.0%")


def test_benchmark_table_gives_each_column_its_own_figure():
    """ms per image is the median request (not the mean), p90 its 90th percentile, peak MiB
    beside held MiB in that order, masks per image the mean over the images."""
    from tools.benchmark import ModeRun, table

    run = ModeRun("ao", ready_seconds=2.5, held_mib=20.0, peak_mib=300.0,
                  seconds=[0.1, 0.1, 0.1, 1.0], masks={0: [], 1: [], 2: [{}, {}, {}]})
    header, _, row = table([run], 3, reference="baseline").splitlines()
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" ready s "] == " 2.5 " and cells[" ms per image (median) "] == " 100 " and cells[" p90 "] == " 730 "
    assert cells[" images/s "] == " 3.077 "
    assert cells[" peak MiB "] == " 300 " and cells[" held MiB "] == " 20 "
    assert cells[" masks per image "] == " 1.0 "


def test_gpu_point_batches_are_halved_to_sixty_four_at_least_and_fit_sixty_percent_of_the_card():
    """A fast mode's batch is halved while it needs more than 60% of the card, never below sam2's
    64 points (on a card too small even for those, 64 all the same)."""
    fast, furious = MODES["fast"], MODES["fast_furious"]
    assert gpu_points_per_batch(fast, 2_000) == gpu_points_per_batch(furious, 500) == 64
    # 512 points of float32 take 10854 MiB: just within 60% of 18091 MiB, not of 18089.
    assert gpu_points_per_batch(fast, 18_091) == 512 and gpu_points_per_batch(fast, 18_089) == 256


def test_a_cpu_peak_counts_what_a_block_still_holds_at_its_end():
    """A request shorter than the 5 ms sampling step: the memory it holds when it ends is its
    peak all the same (read once more at the end), not 0. The reading is the process's: what
    other threads free meanwhile (a full run's earlier tests leave some) counts against it, so
    the block is large and the bound has room (97.1 MiB of 100 was seen)."""
    from sam2serve.timing import PeakMemory

    with PeakMemory("cpu") as memory:
        held = np.empty(400 * 2**20, np.uint8)  # handed out at once, no page touched
    assert memory.mib >= 360
    del held


def test_no_row_holds_the_memory_of_the_process_s_own_set_up():
    """The process's one-off set-up (a CPU's library caches and pools, CUDA's context) counted
    in the first row's held MiB: on a CPU, ao and fast run the same kernels, yet whichever came
    first held 40 MiB and the other 16."""
    held = {}
    for order in (["ao", "fast"], ["fast", "ao"]):
        out = subprocess.run([sys.executable, "-m", "tools.benchmark", "--images", "examples/shapes.jpg",
                              "--points-per-side", "2", "--threads", "1", "--without-reference", "--modes", *order],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        lines = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
        column = [cell.strip() for cell in lines[0]].index("held MiB")
        held[order[0]] = {cells[0].strip(): float(cells[column]) for cells in lines if cells[0].strip() in order}
    assert abs(held["ao"]["ao"] - held["fast"]["ao"]) < 8, held
    assert abs(held["ao"]["fast"] - held["fast"]["fast"]) < 8, held


def test_the_throwaway_run_before_the_rows_ends_no_run_by_its_failure(monkeypatch, caplog):
    """ao's failure there is its row's to tell (noted, the others run); a checkpoint that cannot
    be loaded is every row's."""
    from sam2serve.checkpoints import CheckpointError
    from tools import benchmark

    def load_row(row, *rest):
        raise ValueError("broken")

    monkeypatch.setattr(benchmark, "load_row", load_row)
    benchmark.settle_process(None, SimpleNamespace(), {}, first_image=None)
    assert "ao's throwaway run failed (ValueError: broken)" in caplog.text

    def no_checkpoint(row, *rest):
        raise CheckpointError("not a checkpoint")

    monkeypatch.setattr(benchmark, "load_row", no_checkpoint)
    with pytest.raises(CheckpointError):
        benchmark.settle_process(None, SimpleNamespace(), {}, first_image=None)
