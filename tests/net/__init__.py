"""``pyvhost net`` as a daemon: exit codes, logging, readiness, metrics, sockets it must
not take, and memory that stays bounded over many connections."""
