"""Helpers the tests share (no tests here): the CLI runner, small specs, selection checks."""
