"""pyvhost: memory hot-plug that stays safe for QEMU VMs served by vhost-user back-ends.

Layout:

- ``protocol``  the vhost-user wire format (codec, no I/O) and the one transport module
- ``memory``    guest memory: immutable region snapshots, GPA/VA translation
- ``virtq``     split virtqueues over guest memory
- ``backend``   the back-end connection state machine, the device interface, the server loop
- ``devices``   devices built on the back-end (virtio-net reflector)
- ``frontend``  a front-end that plays QEMU's part, and the leak probe
"""

__version__ = "0.1.0"
