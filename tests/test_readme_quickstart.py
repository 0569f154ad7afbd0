"""The README's quickstart runs as pasted into a file, and without warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    """The one Python code block of the README's "## Quickstart" section."""
    text = README.read_text(encoding="utf-8")
    assert "\n## Quickstart\n" in text, "README.md has no '## Quickstart' section"
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in the quickstart, found {len(blocks)}"
    return blocks[0]


def _usable_cores() -> int:
    # What torch's DataLoader compares num_workers with before warning.
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def test_readme_quickstart_runs_as_pasted(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_code(), encoding="utf-8")
    # Every UserWarning is an error (torch's too-many-workers warning, SamplerCollapseWarning)
    # where the quickstart's 2 workers fit the machine; torch warns on a single core.
    flags = ["-W", "error::UserWarning"] if _usable_cores() >= 2 else []
    done = subprocess.run(
        [sys.executable, *flags, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # nothing of the repository on the path but the installed package
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {e}" for e in range(5)]
    assert lines[-1].endswith("100% of the examples seen so far")
    if flags:
        assert "Warning" not in done.stderr, done.stderr[-3000:]
