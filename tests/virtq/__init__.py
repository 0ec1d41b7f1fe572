"""Split virtqueue tests against rings a test-side driver builds by hand."""
