"""Unit tests of collage_inference.bench (a package so its basenames may repeat in tests/integration)."""
