"""The README's set-up commands: exactly two, and the main job works as written."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    section = REPO.joinpath("README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert main_job.startswith("pip install torch==2.13.0 && ") and "export/build.py" in main_job
    assert tests.startswith("pip install torch==2.13.0 && ") and "pytest" in tests
    assert REPO.joinpath(".ci/run").read_text().count("pytest") == 1


def test_readme_main_job_runs(tmp_path):
    """The main job as written, minus the installs the test environment already has."""
    steps = [s for s in setup_commands()[0].split(" && ") if not s.startswith("pip install")]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(" && ".join(steps), shell=True, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "engine: engines/shapes-sparsezip" in result.stdout
    assert "visual tokens" in result.stderr and "64 / 576" in result.stderr
    assert result.stdout.rstrip().endswith("blue")  # the star in examples/shapes.png is blue
