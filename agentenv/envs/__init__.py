"""Desktop environments: local X desktops, the env service, its clients, the pool, and tasks."""
