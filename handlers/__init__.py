"""One module per kind of message: decode, validate, and say what to store and publish.

Handlers never touch the broker or the database: they return records for the
writer and leave answering to the gateway, so each can be tested on bytes alone.
"""
