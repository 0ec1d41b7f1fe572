"""Guest memory tests on memfd files: translation, table updates, snapshot lifetime."""
