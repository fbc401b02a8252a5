"""The README's runnable examples run (few steps)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, expect", [
    ("quickstart.py", r"max \|folded - connected\| = (\S+); parameters (\d+) \(plain: (\d+)\)"),
    ("hf_trainer.py", r"folded: connected=(False)"),
    ("lazy_aux.py", r"max \|folded - connected\| = (\S+)"),
])
def test_example_runs(script, expect):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--steps", "2"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(expect, result.stdout)
    assert found, result.stdout[-2000:]
    if script == "quickstart.py":
        difference, params, plain = found.groups()
        assert float(difference) < 1e-5 and params == plain
    if script == "lazy_aux.py":
        assert float(found.group(1)) < 1e-5


@pytest.mark.parametrize("script, package, expect", [
    ("accelerate_train.py", "accelerate", r"accelerate: 2 steps on 1 process\(es\).*connected after fold: (\w+); "
                                          r"max \|folded - connected\| = (\S+)"),
    ("lightning_train.py", "lightning.pytorch", r"lightning: 2 steps; mean \|lambda\| logged \S+; connected after "
                                                r"fit: (\w+); max \|folded - connected\| = (\S+)"),
])
def test_trainer_example_runs(script, package, expect, capsys):
    """accelerate and Lightning examples, in this process: torch and timm are imported once for the suite."""
    import importlib.util

    pytest.importorskip(package)
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "examples", script))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(2)
    out = capsys.readouterr().out
    found = re.search(expect, out)
    assert found, out[-2000:]
    connected, difference = found.groups()
    assert connected == "False" and float(difference) < 1e-5
