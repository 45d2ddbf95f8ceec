"""The durable job queue: tables, engine, retry decision, and one small module per role."""
