"""The offline commands: scripts/ and the console scripts call their ``main``, which imports torch after parsing."""
