"""The database side: schema, migrations, the batching writer and the quarantine."""
