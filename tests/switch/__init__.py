"""Switch tests: pyvhost net forwarding between vhost-user ports and taps."""
