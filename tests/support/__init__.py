"""Helpers the tests share: real gateway processes, small file systems. Not tests."""
