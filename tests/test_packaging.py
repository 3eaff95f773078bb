"""The installed distribution puts one top-level name in site-packages: sparsezip_deploy."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sparsezip_deploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"sparsezip_deploy"}
    for package in ("sparsezip", "export", "runtime", "runtime/backends", "calib"):
        assert f"sparsezip_deploy/{package}/__init__.py" in names
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert f"sparsezip_deploy/export/shapes_model/{name}" in names  # the embedded default ships
