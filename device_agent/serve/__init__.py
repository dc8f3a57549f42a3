"""``device-agent serve``: the agent as a service with an OpenAI-compatible HTTP API.

- :mod:`.api`: the API's requests (checked, with OpenAI-style errors) and responses;
- :mod:`.text`: a completion's text as its tokens arrive, cut at stop strings;
- :mod:`.service`: the agent's one worker thread (its link, its request queue, health);
- :mod:`.http`: the HTTP server (auth, TLS, server-sent events);
- :mod:`.config`: the service's configuration (configs/agent.example.toml).

docs/serve.md has the user's view.
"""
