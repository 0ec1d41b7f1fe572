"""Devices served over vhost-user by :mod:`pyvhost.backend`.

- :mod:`.virtio_net`  virtio-net's feature bits, header, config space and receive path
- :mod:`.reflect`     ``ReflectNet``: sends every frame back, MACs swapped
  (``pyvhost net --reflect``)

The switch's port device is in :mod:`pyvhost.switch`, which builds on :mod:`.virtio_net`.
"""
