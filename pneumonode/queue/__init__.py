"""The durable job queue: ORM models, engine setup, state transitions, retry decisions."""
