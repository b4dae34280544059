"""Loading ``get_config()`` files outside the command line.

The command line loads a config file by path through ml_collections' config flag
(``--config=configs/<name>.py[:<arg>]``); scripts and tests that need the same config object call
:func:`load` with the same ``path[:arg]`` spelling. ``configs/`` is also a package (its files
import their siblings as ``from configs import rl_common``), but a file loaded by path is a
fresh module, as the config flag makes it.
"""

from __future__ import annotations

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
