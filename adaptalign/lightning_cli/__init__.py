"""One run from YAML configs: the Lightning CLI over system and data, its checks, run folders."""
