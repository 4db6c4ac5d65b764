"""The core install (no torch, no transformers): the measuring commands say which extra to install in one
line instead of a ModuleNotFoundError traceback (issue #26, item 10)."""
from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = "import sys; sys.modules[{mod!r}] = None; sys.argv = [{prog!r}]; from {module} import main; sys.exit(main())"


@pytest.mark.parametrize("prog,module,mod", [("specbatch-profile", "specbatch.profiler.cli", "torch"),
                                             ("specbatch-validate", "specbatch.fidelity.validate", "torch"),
                                             ("specbatch-validate", "specbatch.fidelity.validate", "transformers")])
def test_measuring_commands_without_the_profile_extra_say_so_in_one_line(tmp_path, prog, module, mod):
    out = subprocess.run([sys.executable, "-c", BLOCK.format(mod=mod, prog=prog, module=module)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr == (f"{prog}: error: this command needs {mod}, which is not installed (the core install only "
                          "simulates); install the profiling extra: pip install 'specbatch[profile]'\n"), out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
