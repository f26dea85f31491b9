"""``alignpro serve``: an OpenAI-compatible proxy (FastAPI + uvicorn) that rewrites prompts on the way.

Modules: ``config`` (:class:`ServeConfig`), ``app`` (the ASGI app), ``upstream`` (the forwarding client),
``rewriting`` (the latest user message through the prompter), ``gating`` (the retry gate and rerank),
``remote_prompter`` (a prompter generating on an OpenAI-compatible server), ``server`` (building and running
the proxy) and ``command`` (the ``alignpro serve`` flags). They need the ``serve`` extra:
``pip install 'alignpro-plugins[serve]'``.
"""
