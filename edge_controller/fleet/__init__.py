"""``edge-controller fleet``: putting agents onto boards over SSH (docs/fleet.md).

- :mod:`.inventory`: the fleet file (defaults, one table per board);
- :mod:`.probe`: what a board is (OS, architecture, Python, Jetson release, CUDA);
- :mod:`.wheelhouse`: the offline install set the edge assembles per platform;
- :mod:`.remote`: one SSH connection to a board (asyncssh), host keys strict;
- :mod:`.deploy`: deploy, status, logs, uninstall, boards in parallel.
"""
