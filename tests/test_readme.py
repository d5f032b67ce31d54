"""The README's Python example runs as pasted."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_python_api_example_runs_as_pasted(tmp_path):
    proc = subprocess.run([sys.executable, "-c", python_api_example()], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the stats are printed on a line of their own, after the streamed reply and the title
    assert re.search(r"^\w+\(prompt_tokens=\d+, prefill_tokens=\d+, reused_tokens=\d+", proc.stdout, re.M), proc.stdout
