"""Runtime plumbing shared by every layer: devices, mixed precision, seeding, distributed
processes, the console, and checkpoint files.  Nothing here knows about recipes or models."""
