"""The wheel carries data/ and an installed kvlens finds it (no source checkout needed)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["counterfact_mini.json", "reference_texts.json", "fluency_sample.txt", "text/enwiki_sample.jsonl.gz"]


def test_wheel_ships_data_and_installed_kvlens_finds_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("kvlens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert any(n.endswith(f".data/data/share/kvlens/data/{name}") for n in names), name
    # a fresh environment with only the wheel (no dependencies: the lookup needs none)
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    code = ("import importlib.util, sysconfig, pathlib; "
            "p = pathlib.Path(sysconfig.get_paths()['purelib']) / 'kvlens' / 'bundled_data.py'; "
            "spec = importlib.util.spec_from_file_location('bd', p); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); print(m.data_dir())")
    found = Path(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True,
                                cwd=tmp_path).stdout.strip())
    assert found == (env / "share" / "kvlens" / "data").resolve() or found == env / "share" / "kvlens" / "data"
    for name in SHIPPED:
        assert (found / name).read_bytes() == (ROOT / "data" / name).read_bytes()
