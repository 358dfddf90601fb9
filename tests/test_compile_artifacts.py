"""benchmarks/compile_artifacts.py: the parts that decide what a run reports (the measurement itself runs on the
machines it measures; BENCHMARKS.md has its figures)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import compile_artifacts  # noqa: E402


def test_unknown_method_is_refused_before_any_work():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_artifacts.py"), "--methods", "aoti,pt3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown method(s) pt3" in proc.stderr and "Traceback" not in proc.stderr
    assert "RESULT" not in proc.stdout and "aoti build" not in proc.stdout


def test_a_crashed_child_reports_its_last_stage_and_stack_without_warnings():
    stderr = "\n".join(["STAGE model loaded", "/x.py:3: UserWarning: slow", "  warnings.warn(msg)",
                        "STAGE package loaded", "Fatal Python error: Segmentation fault", "",
                        '  File "pkg.py", line 7 in load'])
    assert compile_artifacts._tail(stderr) == ["STAGE package loaded", "Fatal Python error: Segmentation fault",
                                               '  File "pkg.py", line 7 in load']
    many = "\n".join(f"line {i}" for i in range(30))
    assert compile_artifacts._tail(many, lines=3) == ["line 27", "line 28", "line 29"]
