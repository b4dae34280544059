"""``get_config()`` files, one per job or sweep; every field is commented.

The command line loads a file by path (``--config=configs/<name>.py[:<arg>]``, ml_collections'
config flag); files that build on another import it as a module of this package, e.g.
``from configs import rl_common``.
"""
