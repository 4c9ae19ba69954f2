"""The emulator's host side: everything that runs in the pytest process (see :mod:`..`)."""
