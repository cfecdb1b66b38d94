"""The Ray side: node provider, command runner and cluster config validation."""
