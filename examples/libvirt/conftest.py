"""This suite has its own rootdir (pytest.ini + vmenv.toml selecting the libvirt backend).

Collected as part of ``pytest examples`` it would run under the emulator examples' config,
so it is left out there: run it as ``python -m pytest examples/libvirt``. ``kept/`` fails on
purpose to show ``--vm-keep failed`` and is left out of this suite too (pytest.ini's
``norecursedirs``): run it by name, ``python -m pytest kept --vm-keep failed`` in this directory.
"""

from pathlib import Path

HERE = Path(__file__).parent


def pytest_ignore_collect(collection_path, config):
    if config.rootpath != HERE and collection_path.is_relative_to(HERE):
        return True
    return None
