"""The guest's own processes: its keeper and its PID 1, forked by the zygote (see :mod:`..`).

Nothing here imports the host side: the zygote preloads this package, and what it imports
every guest pays for at fork time.
"""
