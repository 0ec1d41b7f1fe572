"""Devices served over vhost-user by :mod:`pyvhost.backend`."""
