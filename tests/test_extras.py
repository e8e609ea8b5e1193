"""A core install (torch, numpy, pytest: no extra) runs the tests that need no extra and skips
the others naming the extra to install. Checked in a subprocess where the extras' packages are
made unimportable (sys.modules[name] = None: `import` raises, find_spec answers None)."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRAS = {"triton": "triton", "ray": "ray", "pydantic": "ray", "yaml": "ray", "transformers": "megatron",
          "megatron": "megatron", "verl": "test", "trl": "test", "openrlhf": None}
FILES = ["test_gae.py", "test_sched_config.py", "test_sched_actors.py", "test_reshard.py", "test_compat_patch.py"]


def test_missing_extras_skip_with_the_extra_named():
    blocked = ", ".join(repr(n) for n in EXTRAS)
    code = (f"import sys\nfor n in ({blocked},): sys.modules[n] = None\n"
            "import pytest\nsys.exit(pytest.main(sys.argv[1:]))")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # plugins of installed extras import them
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code, "-q", "-rs", "-p", "no:cacheprovider",
                          *[os.path.join(HERE, f) for f in FILES]],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert " passed" in text.splitlines()[-1], text[-500:]  # the core tests ran
    for reason in ("triton is not installed (pip install 'rlhfkern[triton]')",
                   "pydantic is not installed (pip install 'rlhfkern[ray]')",
                   "transformers is not installed (pip install 'rlhfkern[megatron]')",
                   "verl is not installed (pip install 'rlhfkern[test]')",
                   "trl is not installed (pip install 'rlhfkern[test]')",
                   "openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)"):
        assert reason in text, reason
