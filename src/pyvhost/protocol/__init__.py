"""The vhost-user protocol: constants, typed messages, a sans-I/O codec and the transport.

Only :mod:`pyvhost.protocol.transport` touches sockets; everything else turns
``(bytes, fds)`` into typed messages and back.
"""
