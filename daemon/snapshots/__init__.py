"""The daily snapshot: schedule, plan, execute, copying, verify."""
