"""The daemon: lifecycle, watcher, scheduler, sd_notify."""
