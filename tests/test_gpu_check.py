"""gpu_check/run.sh without a GPU: the summary's rules (only a non-zero exit status is a
failure; what did not run is listed apart, with its reason), the dry run that checks every
stage's commands resolve, the real run's path when the build is unusable, and the sanitizer
driver's own logic (run on the CPU operator). Each check has a negative control."""

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_check import build_cache as gpu_build_cache
from gpu_check import dry_run as gpu_dry_run
from gpu_check import summary as gpu_summary

REPO = Path(__file__).resolve().parent.parent

SCRIPT = REPO / "gpu_check" / "run.sh"


def write_step(results, stage, step, result, seconds=1, limit=60, cap=60, reason="", command="cmd", log=None):
    """One step's record, as gpu_check.sh's record() writes it, and optionally its log."""
    stage_dir = results / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = f"2026-11-21T10:00:{len(list(stage_dir.glob('*.step.tsv'))):02d}.0Z"
    fields = [step, str(result), str(seconds), str(limit), str(cap), started, reason, command]
    (stage_dir / f"{step}.step.tsv").write_text("\t".join(fields) + "\n")
    if log is not None:
        (stage_dir / f"{step}.log").write_text(log)


def statuses(summary):
    return {(r["stage"], r["step"]): r["status"] for r in summary["rows"]}


@pytest.mark.parametrize(
    "result, limit, cap, status, why",
    [
        ("0", "60", "60", "ok", ""),
        ("1", "60", "60", "failed", "exit status 1"),
        ("3", "60", "60", "failed", "exit status 3"),
        ("124", "300", "300", "failed", "timed out after 300 s"),
        ("124", "120", "300", "failed", "cut from its 300 s cap"),
        ("137", "60", "60", "failed", "killed"),
        ("not-run", "", "", "not_run", "compute-sanitizer not found"),
    ],
)
def test_classify(result, limit, cap, status, why):
    got_status, got_why = gpu_summary.classify(result, limit, cap, "compute-sanitizer not found")
    assert got_status == status and why in got_why


def synthetic_run(results):
    """A run with every kind of row: passes, a test failure, a time-out, steps that did not run
    (no sanitizer, a budget skip), a skipped test and a part declared NOT RUN in a log."""
    write_step(results, "build", "build", 0, log="restored from build/gpu-cache/x.tar.gz; not rebuilt\n")
    write_step(results, "build", "backend", 0)
    write_step(
        results,
        "tests",
        "suite",
        1,
        log="FAILED tests/test_cuda.py::test_raw_ops\n"
        "SKIPPED [1] tests/test_cuda.py:179: needs two GPUs\n3 failed, 60 passed in 50.0s\n",
    )
    write_step(results, "sanitize", "memcheck", 124, limit=180, cap=180)
    write_step(results, "sanitize", "racecheck", "not-run", reason="compute-sanitizer not found")
    write_step(results, "bench", "bench_gpu", 0, log="NOT RUN: case 1b: needs 9 GB\nwrote bench_gpu.json\n")
    write_step(results, "bench", "bench_update_cuda", "not-run", reason="time budget: 10s left in this call")


def test_aggregate_counts_only_nonzero_exits_as_failures(tmp_path):
    synthetic_run(tmp_path)
    summary = gpu_summary.write_aggregate(tmp_path)
    st = statuses(summary)
    assert st[("build", "build")] == "ok" and st[("bench", "bench_gpu")] == "ok"
    assert st[("tests", "suite")] == "failed" and st[("sanitize", "memcheck")] == "failed"
    assert st[("sanitize", "racecheck")] == "not_run" and st[("bench", "bench_update_cuda")] == "not_run"
    assert st[("tests", "suite: tests/test_cuda.py:179")] == "not_run"  # pytest -rs skip line
    assert st[("bench", "bench_gpu: case 1b")] == "not_run"  # declared in the log
    for stage in ("profile", "trainers"):  # never ran in any call
        assert st[(stage, "(whole stage)")] == "not_run"
    assert summary["counts"] == {"ok": 3, "failed": 2, "not_run": 6} and not summary["ok"]
    text = (tmp_path / "summary.txt").read_text()
    assert "FAILURES: 2 failed, 3 ok, 6 not run" in text
    assert "tests/suite: exit status 1" in text and "3 failed, 60 passed" in text
    assert "sanitize/memcheck: timed out after 180 s" in text
    assert "sanitize/racecheck: compute-sanitizer not found" in text and "needs two GPUs" in text
    assert gpu_summary.main(["aggregate", str(tmp_path)]) == 1


def clean_run(results):
    """Nothing failed, several things did not run: the old script's summary called this FAILURES."""
    write_step(results, "build", "build", 0)
    write_step(results, "sanitize", "memcheck", "not-run", reason="compute-sanitizer not found")
    write_step(results, "trainers", "dqn", "not-run", reason="gymnasium is not importable")


def assert_clean_run_passes(results):
    summary = gpu_summary.write_aggregate(results, expect=("build", "sanitize", "trainers"))
    assert summary["ok"] and summary["counts"] == {"ok": 1, "failed": 0, "not_run": 2}, summary["counts"]
    assert summary["verdict"].startswith("NO FAILURES, INCOMPLETE")
    assert gpu_summary.main(["aggregate", str(results), "--expect", "build,sanitize,trainers"]) == 0


def test_not_run_is_not_a_failure(tmp_path):
    clean_run(tmp_path)
    assert_clean_run_passes(tmp_path)


def test_negative_control_summary(tmp_path, monkeypatch):
    """The check can fail: one non-zero exit turns the verdict, and a classifier that counts
    rows that did not run as failures (the old gpu_check.sh) is caught."""
    clean_run(tmp_path)
    write_step(tmp_path, "trainers", "a2c", 2)
    with pytest.raises(AssertionError):
        assert_clean_run_passes(tmp_path)
    (tmp_path / "trainers" / "a2c.step.tsv").unlink()
    monkeypatch.setattr(gpu_summary, "classify", lambda result, *_: ("ok" if result == "0" else "failed", ""))
    with pytest.raises(AssertionError):
        assert_clean_run_passes(tmp_path)


def test_a_later_call_replaces_a_step(tmp_path):
    """Calls merge by extracting their archives into one folder: the later record of a step wins."""
    write_step(tmp_path, "sanitize", "memcheck", 0)
    write_step(tmp_path, "sanitize", "racecheck", "not-run", reason="time budget")
    assert gpu_summary.write_aggregate(tmp_path, expect=("sanitize",))["counts"]["not_run"] == 1
    write_step(tmp_path, "sanitize", "racecheck", 0)  # the second call ran it
    assert gpu_summary.write_aggregate(tmp_path, expect=("sanitize",))["counts"] == {"ok": 2, "failed": 0, "not_run": 0}


def run_script(*args, cwd=REPO, script=SCRIPT, env=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_passes_here():
    """Every stage's commands resolve on this machine (GPU-only tools noted), and the step
    machinery classifies exit 0 / exit 1 / a time-out / a budget skip / a declared NOT RUN."""
    r = run_script("--dry-run", "all")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selfcheck: ok" in r.stdout
    assert "dry run: 0 of 14 planned commands do not resolve" in r.stdout
    for step in (
        "build/build",
        "tests/suite",
        "sanitize/memcheck_fallback",
        "sanitize/synccheck",
        "bench/bench_update_cuda",
        "profile/update",
        "profile/kernel",
        "trainers/reinforce",
    ):
        assert f"resolved    {step}:" in r.stdout


def copy_tree(dst):
    """The parts of the repository the check script reads, without any built extension."""
    for sub in ("bench", "examples", "tests", "fastclip", "csrc", "gpu_check"):
        shutil.copytree(REPO / sub, dst / sub, ignore=shutil.ignore_patterns("*.so", "__pycache__", "results"))
    shutil.copy2(REPO / "setup.py", dst / "setup.py")
    return dst


def test_negative_control_dry_run_catches_unresolved_commands(tmp_path):
    tree = copy_tree(tmp_path / "repo")
    (tree / "gpu_check" / "profile_update.py").unlink()
    common = tree / "examples" / "common.py"  # the trainers' shared Args
    common.write_text(common.read_text().replace("eval_episodes:", "n_eval_episodes:"))
    r = run_script("--dry-run", "profile", "trainers", cwd=tree, script=tree / "gpu_check" / "run.sh")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "script gpu_check/profile_update.py does not exist" in r.stdout
    assert "examples/a2c.py defines no --eval-episodes" in r.stdout
    assert "dry run: 5 of 7 planned commands do not resolve" in r.stdout  # both profile steps, the 3 trainers


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["python", "-c", "print("], "does not compile"),
        (["python", "-m", "no_such_module_here"], "is not installed"),
        (["python", "-m", "pytest", "-q", "tests/test_nothing*.py"], "does not exist"),
        (["python", "-m", "bench.bench_update", "--no-such-flag"], "defines no --no-such-flag"),
        (["env", "A=1", "no-such-executable", "x"], "not found"),
    ],
)
def test_negative_control_check_command(argv, problem):
    problems, _ = gpu_dry_run.check_command(argv, "python")
    assert any(problem in p for p in problems), problems


def test_real_run_with_unusable_build_fails_and_skips_the_rest(tmp_path):
    """The real (not dry) path here, no GPU: a cached build that does not load makes the backend
    step fail, every later stage is reported not run for that reason, and the export has what
    must come back (archive and summaries, no build archive: nothing was built)."""
    tree = copy_tree(tmp_path / "repo")
    k = gpu_build_cache.key(gpu_build_cache.build_env(), tree)
    bogus = tmp_path / "fastclip" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    bogus.parent.mkdir()
    bogus.write_text("not an ELF file\n")
    archive = tree / "build" / "gpu-cache" / f"fastclip-cuda-{k}.tar.gz"
    archive.parent.mkdir(parents=True)
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path), f"fastclip/{bogus.name}"], check=True)
    r = run_script(
        "--out",
        str(tree / "results"),
        "--export",
        str(tmp_path / "out"),
        "tests",
        cwd=tree,
        script=tree / "gpu_check" / "run.sh",
        env={"GPU_CHECK_BUDGET_S": "200"},
    )
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tree / "results" / "summary.txt").read_text()
    assert "restored from build/gpu-cache" in (tree / "results" / "build" / "build.log").read_text()
    assert "build/backend: exit status 1" in summary
    assert "tests/suite: the build stage failed in this call" in summary
    assert "FAILURES: 1 failed, 1 ok, 1 not run" in summary
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert (
        len(exported) == 3 and exported[0].startswith("gpu-check-") and exported[1:] == ["summary.json", "summary.txt"]
    )


def test_build_key_follows_sources_and_switches(tmp_path):
    tree = copy_tree(tmp_path / "repo")
    env = {"TORCH_CUDA_ARCH_LIST": "9.0"}
    k = gpu_build_cache.key(env, tree)
    assert gpu_build_cache.key(dict(env), tree) == k
    assert gpu_build_cache.key({**env, "DEBUG": "1"}, tree) != k
    assert gpu_build_cache.key({"TORCH_CUDA_ARCH_LIST": "8.0"}, tree) != k
    assert gpu_build_cache.key({**env, "CXX": "g++-13"}, tree) != k  # another compiler: built again
    assert gpu_build_cache.key({**env, "LDFLAGS": "-static-libstdc++"}, tree) != k
    (tree / "csrc" / "cuda" / "clip_kernels.cu").write_text("// changed\n", encoding="utf-8")
    assert gpu_build_cache.key(env, tree) != k


@pytest.fixture
def driver():
    from fastclip import _ops

    if not _ops.has_kernels("cpu"):
        pytest.skip("the extension is not built: the CPU operator runs the driver's calls")
    from gpu_check import sanitize_driver

    return sanitize_driver


def test_sanitize_driver_runs_every_set_on_cpu(driver, capsys):
    """The driver's calls and checks, on the CPU operator (same schemas): a mistake in it must
    not first show up on a lent GPU."""
    assert driver.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("mixed", "misaligned", "strided", "one_tile", "inline_large", "table", "overflow"):
        assert f"set {name}:" in out
    assert "0 mismatches" in out and "NOT RUN" not in out


def test_negative_control_sanitize_driver_detects_wrong_results(driver, monkeypatch, capsys):
    real = driver.ref_norm
    monkeypatch.setattr(driver, "ref_norm", lambda grads, p: 1.01 * real(grads, p))
    assert driver.main(["--device", "cpu"]) == 3
    assert "MISMATCH" in capsys.readouterr().out


def test_sanitize_driver_generic_call_of_further_ops(driver):
    """A new op with a simple schema (Tensor[] then floats) is called without a recipe; one that
    takes anything else is declared NOT RUN."""
    schemas = {s.name: s for s in driver.fastclip_schemas()}
    assert {"fastclip::total_norm", "fastclip::scale_", "fastclip::clip_grad_norm_"} <= set(schemas)
    import torch

    call = driver.generic_call(schemas["fastclip::total_norm"], [torch.ones(4)])
    assert call is not None and float(call()) == pytest.approx(2.0)
    assert driver.generic_call(schemas["fastclip::scale_"], [torch.ones(4)]) is None  # a Tensor coef
