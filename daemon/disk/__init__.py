"""Disk usage: mounts, the pressure escalation, the forecast."""
