"""Tools that watch and drive other processes: the procfs meter (fds and mappings of a
process), the timestamping vhost-user relay, and ending helper processes by pid.

The lab, the probe, the demo, the benchmarks and the tests use them; none of them speaks
for a device or a guest.
"""
