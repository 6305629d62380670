"""The import paths users' scripts and plugins used before the package layout keep working: each
old module name is the very module object of its new home (registries, isinstance checks and
monkeypatching see one module), and the plugin example of docs/architecture.md still runs."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, WAIT_S
from dtm_core.moved import MOVED, new_name


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_submodules_and_names_of_moved_packages():
    import dtm_core.compression.methods.base as base
    import dtm_core.compression.methods.registry as registry
    from dtm_core.methods import Method, parse_spec, register
    from dtm_core.methods.base import Method as Method2
    from dtm_core.methods.registry import register as register2

    assert Method is Method2 is base.Method and register is register2 is registry.register
    assert importlib.import_module("dtm_core.methods.rtn") is importlib.import_module(
        "dtm_core.compression.methods.rtn")
    assert str(parse_spec("int4:g128")) == "int4:g128"
    # names users import from the old modules
    from dtm_core.compress import Recipe, apply_recipe  # noqa: F401
    from dtm_core.divergence import divergence  # noqa: F401
    from dtm_core.families import FAMILIES  # noqa: F401
    from dtm_core.metrics import register_metric  # noqa: F401
    from dtm_core.models import LoadedModel, load_model  # noqa: F401
    from dtm_core.sweep import prepare, sweep  # noqa: F401
    from dtm_core.checkpoints import FORMATS, inspect  # noqa: F401
    assert {"compressed-tensors", "gptq", "awq", "bitsandbytes", "torchao"} <= set(FORMATS)
    assert new_name("dtm_core.methods.gptq") == "dtm_core.compression.methods.gptq"
    assert new_name("dtm_core.jobs") is None


def test_an_unknown_old_name_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dtm_core.no_such_module")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dtm_core.methods.no_such_method")


@pytest.mark.parametrize("paths", ["new", "old"])
def test_the_plugin_example_of_the_architecture_doc_runs(tmp_path, paths):
    """The method-plugin example in docs/architecture.md registers through DTM_PLUGINS, as written
    (the new paths) and with the old ones (dtm_core.methods.base, dtm_core.methods.registry)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(from dataclasses import dataclass\n.*?)```", doc, re.S).group(1)
    assert "from dtm_core.compression.methods.base import Method" in code
    if paths == "old":
        code = code.replace("dtm_core.compression.methods", "dtm_core.methods")
        assert "from dtm_core.methods.base import Method" in code
    code = code.replace("        ...\n", "        return w * (w.abs() > w.abs().median())\n")
    (tmp_path / "my_methods.py").write_text(code)
    env = dict(os.environ, DTM_PLUGINS="my_methods",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run([sys.executable, "-c",
                          "from dtm_core.plugins import load_plugins; load_plugins()\n"
                          "import torch\n"
                          "from dtm_core.methods import parse_spec\n"
                          "sp = parse_spec('myprune:0.25')\n"
                          "w = torch.arange(1.0, 9.0).reshape(2, 4)\n"
                          "print(sp, int((sp.apply(w, {}) == 0).sum()))"],
                         env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "myprune:0.25 4"
