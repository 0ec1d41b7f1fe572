"""Tools that watch and drive other processes: the procfs meter (fds and mappings of a
process), the timestamping vhost-user relay, and ending helper processes by pid.

The lab, the probe, the demo, the benchmarks and the tests use them; the back-end uses
:func:`.procfs.unix_listening` before it replaces a socket file. None of them speaks for a
device or a guest.
"""
