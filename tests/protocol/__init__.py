"""Codec and transport tests: golden wire bytes, bad input, real Unix sockets."""
