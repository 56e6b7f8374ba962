"""The signal gateway: webhook, inbox, fenced executor, brokers, positions, jobs."""
