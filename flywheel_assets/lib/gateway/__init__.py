"""The gateway: the OpenAI-compatible door through which real agents use the registry's models.

keys.py (API keys → tenants), conversations.py (one trajectory per agent conversation),
journal.py (write-ahead, then atomic landing files), backends.py (embedded transformers
with micro-batching, or an upstream OpenAI-compatible server), service.py (the rules),
app.py (HTTP). README: Gateway.
"""
