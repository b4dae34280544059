"""``get_config()`` files, one per job or sweep; every field is commented.

The command line loads a file by path (``--config=configs/<name>.py[:<arg>]``, ml_collections'
config flag); files that build on another import it as a module of this package, e.g.
``from configs import rl_common``. Scripts and tests that need the same config object as
``--config=<spec>`` gives call :func:`load` with the same ``path[:arg]`` spelling.
"""

import importlib.util
import os
import re

import ml_collections


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``spec`` = ``path`` or ``path:arg``, as ``--config=<spec>`` would give it.

    Calls the file's ``get_config(arg)`` when an argument is given, else ``get_config()``.

    Raises:
      FileNotFoundError: ``path`` is not a file.
    """
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (cwd {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location(
        "_config_" + re.sub(r"\W", "_", os.path.abspath(path)), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()
