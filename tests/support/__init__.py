"""Test rigs: what the tests (and people trying things locally) run besides the code under test."""
