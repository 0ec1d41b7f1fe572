"""Back-end tests: pyvhost serving ReflectNet over real Unix sockets."""
