"""What the tests share: tiny systems, generated captions, process launchers, probes."""
